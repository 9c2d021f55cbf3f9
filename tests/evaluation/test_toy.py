from openldm.evaluation.toy import mixture_report
from openldm.registry import SAMPLERS


def test_mixture_report_covers_every_sampler_and_is_close():
    text = mixture_report(steps=(5, 50), num_samples=2000)
    rows = [line.split() for line in text.splitlines()[2:-1]]
    assert sorted({r[0] for r in rows}) == SAMPLERS.names()
    var_err = {(r[0], int(r[1])): float(r[3].rstrip("%")) for r in rows}
    for name in SAMPLERS.names():
        assert var_err[(name, 50)] < 10.0, (name, var_err[(name, 50)])
    # deterministic solvers get closer with more steps
    for name in ("euler", "heun", "dpmpp_2m", "ddim"):
        assert var_err[(name, 50)] < var_err[(name, 5)]
