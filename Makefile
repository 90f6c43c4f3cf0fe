.PHONY: demo test crd install-manifest
demo:  ## run the whole pipeline locally on the example data, print the result JSON
	scripts/demo.sh
test:  ## run the test suite (installs what it needs)
	scripts/test.sh
crd:   ## regenerate the CRD YAML from the Python models
	.venv/bin/python -m chatbot_api.crd --write
