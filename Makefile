.PHONY: demo test generate images push
demo:      ## run the whole pipeline locally on the example data, print the result JSON
	scripts/demo.sh
test:      ## run the test suite (installs what it needs)
	scripts/test.sh
generate:  ## regenerate the CRDs, README spec reference, chart RBAC and helm/install.yaml from the code
	.venv/bin/python -m chatbot_api.crd --write
	.venv/bin/python -m chatbot_api.reference --write
	.venv/bin/python -m chatbot_operator.rbac --write
	helm/render-install.sh
images:    ## build the operator and trainer images (docker, podman or buildah); TORCH=cpu: a CPU trainer
	scripts/images.sh build --torch $(or $(TORCH),cuda)
push:      ## push both images to REGISTRY (e.g. make push REGISTRY=ghcr.io/you)
	scripts/images.sh push --torch $(or $(TORCH),cuda) $(REGISTRY)
