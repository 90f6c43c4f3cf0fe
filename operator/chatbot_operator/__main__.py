"""`chatbot-operator`: run the ChatbotTraining operator.

Flags override the CHATBOT_* environment variables (see `settings.py`). Equivalent plain Kopf
invocation: `kopf run -m chatbot_operator.handlers --all-namespaces` (then the operator
reads its configuration from the environment only, and Kopf's own flags apply).
"""

from __future__ import annotations

import argparse
import random
import sys

from chatbot_operator.settings import ConfigError, OperatorConfig, resync_seconds_from_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatbot-operator",
        description="Kubernetes operator that fine-tunes chatbots (LoRA) and exports GGUF.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="serve this namespace (repeatable; default: CHATBOT_NAMESPACES, "
                       "or all namespaces)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="serve all namespaces (overrides CHATBOT_NAMESPACES)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="Prometheus /metrics port, -1 to disable (CHATBOT_METRICS_PORT)")
    parser.add_argument("--health-port", type=int, metavar="PORT",
                        help="liveness /healthz port, -1 to disable (CHATBOT_HEALTH_PORT)")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME",
                         help="Kopf peering object shared by the replicas (CHATBOT_PEERING_NAME)")
    peering.add_argument("--standalone", action="store_true",
                         help="no peering: only ever run one replica")
    parser.add_argument("--priority", type=int,
                        help="peering priority; the live replica with the highest one is active "
                        "(CHATBOT_PEERING_PRIORITY; default: random)")
    parser.add_argument("--trainer-image", metavar="IMAGE",
                        help="default trainer image (CHATBOT_TRAINER_IMAGE)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def config_from_args(args: argparse.Namespace, base: OperatorConfig) -> OperatorConfig:
    changes: dict = {}
    if args.all_namespaces:
        changes["namespaces"] = ()
    elif args.namespaces:
        changes["namespaces"] = tuple(dict.fromkeys(args.namespaces))
    if args.metrics_port is not None:
        changes["metrics_port"] = args.metrics_port
    if args.health_port is not None:
        changes["health_port"] = args.health_port
    if args.standalone:
        changes["peering_name"] = None
    elif args.peering:
        changes["peering_name"] = args.peering
    if args.priority is not None:
        changes["peering_priority"] = args.priority
    if args.trainer_image:
        changes["trainer_image"] = args.trainer_image
    return base.replace(**changes)


def kopf_options(config: OperatorConfig) -> dict:
    """Keyword arguments of kopf.run()/kopf.operator() for this configuration."""
    options: dict = {
        "clusterwide": config.clusterwide,
        "namespaces": list(config.namespaces),
        "standalone": config.standalone,
    }
    if not config.standalone:
        options["peering_name"] = config.peering_name
        # Replicas with equal priorities would all pause; distinct ones make one active and
        # the others stand by until its peering record expires.
        options["priority"] = (config.peering_priority if config.peering_priority is not None
                               else random.randint(1, 2**31 - 1))
    if config.health_port >= 0:
        options["liveness_endpoint"] = f"http://0.0.0.0:{config.health_port}/healthz"
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, OperatorConfig.from_env())
        resync_seconds_from_env()
    except ConfigError as exc:
        print(f"chatbot-operator: {exc}", file=sys.stderr)
        return 2

    import kopf

    import chatbot_operator.handlers  # noqa: F401 - registers the handlers

    # Name the object on every line about one, as `kopf run` does.
    kopf.configure(verbose=args.verbose, quiet=args.quiet, log_prefix=True)
    kopf.run(memo=kopf.Memo(config=config), **kopf_options(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
