"""Samplers: stateless functions with one signature over the denoiser interface (see ``base``), registered in
``SAMPLERS`` as ``SamplerSpec`` entries (callable like the function they hold).

=================  ==============================  ===========================================
name               function                        schedule convention (diffusers scheduler)
=================  ==============================  ===========================================
ddpm               ddpm.sample_ddpm                DDPMScheduler (variance "fixed_small")
ddim               ddim.sample_ddim                DDIMScheduler
euler              euler.sample_euler              EulerDiscreteScheduler
euler_ancestral    euler.sample_euler_ancestral    EulerAncestralDiscreteScheduler
heun               euler.sample_heun               HeunDiscreteScheduler
lms                lms.sample_lms                  LMSDiscreteScheduler
dpmpp_2m           dpm_solver.sample_dpmpp_2m      DPMSolverMultistepScheduler (dpmsolver++)
dpmpp_2m_sde       dpm_solver.sample_dpmpp_2m_sde  DPMSolverMultistepScheduler (sde-dpmsolver++)
=================  ==============================  ===========================================

Build the noise levels for any of them with ``openldm.diffusion.spacing.make_plan(name, ...)``.
"""
from openldm.registry import SAMPLERS
from openldm.samplers.base import SamplerSpec, blend_known
from openldm.samplers.ddim import sample_ddim
from openldm.samplers.ddpm import sample_ddpm
from openldm.samplers.dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from openldm.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from openldm.samplers.guidance import CFGDenoiser, rescale_guidance
from openldm.samplers.lms import sample_lms

SAMPLERS.register("ddpm", SamplerSpec(sample_ddpm, "ddpm", "DDPMScheduler", supports_karras=False, stochastic=True,
                                      a1111_name="DDPM"))
SAMPLERS.register("ddim", SamplerSpec(sample_ddim, "ddim", "DDIMScheduler", supports_karras=False, stochastic=False,
                                      a1111_name="DDIM"))
SAMPLERS.register("euler", SamplerSpec(sample_euler, "euler", "EulerDiscreteScheduler", supports_karras=True,
                                       stochastic=False, a1111_name="Euler"))
SAMPLERS.register("euler_ancestral", SamplerSpec(sample_euler_ancestral, "euler_ancestral",
                                                 "EulerAncestralDiscreteScheduler", supports_karras=True,
                                                 stochastic=True, a1111_name="Euler a"))
SAMPLERS.register("heun", SamplerSpec(sample_heun, "heun", "HeunDiscreteScheduler", supports_karras=True,
                                      stochastic=False, a1111_name="Heun"))
SAMPLERS.register("lms", SamplerSpec(sample_lms, "lms", "LMSDiscreteScheduler", supports_karras=True, stochastic=False,
                                     a1111_name="LMS"))
SAMPLERS.register("dpmpp_2m", SamplerSpec(sample_dpmpp_2m, "dpm", "DPMSolverMultistepScheduler",
                                          supports_karras=True, stochastic=False, a1111_name="DPM++ 2M"))
SAMPLERS.register("dpmpp_2m_sde", SamplerSpec(sample_dpmpp_2m_sde, "dpm", "DPMSolverMultistepScheduler",
                                              supports_karras=True, stochastic=True, a1111_name="DPM++ 2M SDE"))



def a1111_name(name: str) -> str:
    """AUTOMATIC1111's name of the registered sampler ``name`` ("euler_ancestral" -> "Euler a")."""
    return SAMPLERS.get(name).a1111_name


def from_a1111_name(text: str) -> tuple[str, bool]:
    """The registered sampler and whether Karras sigmas are asked for, from an A1111 sampler name or ours:
    "Euler a" -> ("euler_ancestral", False); the legacy "DPM++ 2M Karras" -> ("dpmpp_2m", True). Unknown names
    raise a KeyError listing the accepted ones."""
    names = {spec.a1111_name: name for name, spec in SAMPLERS.items()}
    karras = text.endswith(" Karras") and text[: -len(" Karras")] in names
    base = text[: -len(" Karras")] if karras else text
    if base in names:
        return names[base], karras
    if base in SAMPLERS.names():
        return base, False
    raise KeyError(f"unknown sampler {text!r}; choose one of: {', '.join(names)} (or ours: "
                   f"{', '.join(SAMPLERS.names())}); add ' Karras' for Karras noise levels")


__all__ = ["a1111_name", "from_a1111_name", "SamplerSpec", "CFGDenoiser", "rescale_guidance", "blend_known",
           "sample_ddpm", "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lms",
           "sample_dpmpp_2m", "sample_dpmpp_2m_sde"]
