# The whole set-up on a fresh machine (Python 3.11, no GPU needed):
#   make book    create .venv, run every notebook with PROFILE (default: book), build the Jupyter Book
#   make test    unit tests, the notebooks' smoke run (nbval-lax) and the book's reproducibility check
PYTHON  ?= python3
VENV    := .venv
BIN     := $(CURDIR)/$(VENV)/bin
PROFILE ?= book
NOTEBOOKS := linkage width depth params allcnn resnet scaling moons zero_init mnist cifar beyond

export ALIVE_DATA    ?= $(abspath $(CURDIR)/../shared/data)
export ALIVE_RESULTS ?= $(CURDIR)/results
export PATH          := $(BIN):$(PATH)
export PYTHONHASHSEED := 0

.PHONY: book notebooks html test unit smoke reproduce bench clean env

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

book: notebooks html

# Run each notebook with the chosen profile into book/ (stored results are re-used; only
# missing runs train). PROFILE=smoke uses the notebooks' own defaults.
notebooks: env
	@for nb in $(NOTEBOOKS); do \
	  echo "papermill $$nb ($(PROFILE))"; \
	  if [ "$(PROFILE)" = smoke ]; then opts="-p profile smoke"; else opts="-f profiles/$(PROFILE)/$$nb.yml"; fi; \
	  $(BIN)/papermill notebooks/$$nb.ipynb book/$$nb.ipynb $$opts --cwd book -k python3 --log-level WARNING || exit 1; \
	done

html: env
	$(BIN)/jupyter-book build . --config _config.yml --toc book/_toc.yml --path-output book --warningiserror --keep-going
	@echo "book: $(CURDIR)/book/_build/html/index.html"

test: unit smoke reproduce

unit: env
	$(BIN)/python -m pytest tests -q

# every notebook with its smoke defaults (what CI runs; seconds each)
smoke: env
	rm -rf .smoke-results
	cd notebooks && ALIVE_RESULTS=$(CURDIR)/.smoke-results $(BIN)/python -m pytest --nbval-lax -q -p no:cacheprovider .

# the published notebooks, re-executed from the stored results (no training allowed), must
# reproduce their own tables (timings and paths sanitised)
reproduce: env
	cd book && ALIVE_NO_TRAIN=1 $(BIN)/python -m pytest --nbval -q -p no:cacheprovider --nbval-sanitize-with sanitize.cfg $(addsuffix .ipynb,$(NOTEBOOKS))

bench: env
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/trainer.py
	$(BIN)/python bench/grid.py

clean:
	rm -rf book/_build
