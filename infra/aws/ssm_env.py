"""Print `export NAME=value` lines for the parameters under an SSM Parameter Store path, for `eval`.

    eval "$(python infra/aws/ssm_env.py /raybooth/ray/)"

ray_cluster.yaml runs this on every node before `ray start` (and before the MLflow server), so secrets
reach the processes that need them without being written into the repo, the cluster YAML or the image:
the parameter `/raybooth/ray/RAYBOOTH_API_KEYS` becomes `RAYBOOTH_API_KEYS`. The node reads them with
its IAM instance profile (`ssm:GetParametersByPath` + `kms:Decrypt` for SecureStrings).

A node that cannot read the path (no permission, no such parameters, no network) prints nothing and a
warning on stderr, and exits 0: the cluster still starts, with the defaults that need no secret.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

# Only names a shell can export; anything else in the path is skipped with a warning.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_lines(path: str, client) -> list[str]:
    """`export NAME=<quoted value>` for each parameter directly under `path` (decrypted)."""
    lines = []
    pages = client.get_paginator("get_parameters_by_path").paginate(
        Path=path, Recursive=False, WithDecryption=True
    )
    for page in pages:
        for parameter in page["Parameters"]:
            name = parameter["Name"].rsplit("/", 1)[-1]
            if not ENV_NAME.match(name):
                print(f"ssm_env: skipping {parameter['Name']}: not a valid variable name", file=sys.stderr)
                continue
            lines.append(f"export {name}={shlex.quote(parameter['Value'])}")
    return sorted(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="/raybooth/ray/", help="SSM path (default /raybooth/ray/)")
    parser.add_argument("--region", default=None, help="AWS region (default: AWS_DEFAULT_REGION)")
    args = parser.parse_args(argv)
    path = args.path if args.path.endswith("/") else args.path + "/"
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client("ssm", region_name=args.region)
        lines = env_lines(path.rstrip("/") or "/", client)
    except (BotoCoreError, ClientError, ImportError) as e:
        print(f"ssm_env: no secrets read from {path} ({type(e).__name__}: {e})", file=sys.stderr)
        return 0
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
