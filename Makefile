.PHONY: demo test generate
demo:      ## run the whole pipeline locally on the example data, print the result JSON
	scripts/demo.sh
test:      ## run the test suite (installs what it needs)
	scripts/test.sh
generate:  ## regenerate the CRDs, README spec reference, chart RBAC and helm/install.yaml from the code
	.venv/bin/python -m chatbot_api.crd --write
	.venv/bin/python -m chatbot_api.reference --write
	.venv/bin/python -m chatbot_operator.rbac --write
	helm/render-install.sh
