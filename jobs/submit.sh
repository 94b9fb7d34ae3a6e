#!/usr/bin/env bash
# Submit one tspin-ray training run to a running Ray cluster through its job server (`ray job submit`).
#
#   jobs/submit.sh CONFIG [key.sub=value ...] [--no-wait] [--submission-id ID] [--dry-run]
#
#   export RAY_ADDRESS=http://127.0.0.1:8265            # the head's job server (= dashboard port)
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token>   # Ray 2.60 clusters use token auth (docs/cluster.md)
#   jobs/submit.sh jobs/tiny-cpu.yaml output_dir=/mnt/runs/tiny-cpu
#   jobs/submit.sh jobs/zephyr-7b-tspin-2x8.yaml output_dir=/mnt/runs/z-tspin --no-wait
#
# The first line printed is `submission id: ID`. Without --no-wait the script then follows the driver's
# log and exits 0 when the job SUCCEEDED, non-zero when it failed or was stopped; with --no-wait it returns
# once the job is accepted. Then: `ray job logs -f ID`, `ray job status ID`, `ray job stop ID`.
# A stopped or failed run resumes when the same command (same config, overrides and output_dir) is
# submitted again: the run directory, not the job, holds the state.
#
# The driver runs on the head node with RAY_ADDRESS set by the job server, so `tspin-ray` connects to the
# cluster instead of starting a Ray of its own. output_dir must be an absolute path on storage that
# every node mounts at the same place (e.g. /mnt/runs on KubeRay, cluster/pvc-runs.yaml): generator and
# trainer actors on other nodes read and write checkpoints there. A relative output_dir would land
# inside the job's unpacked copy of the working directory on the head node (and go with the cluster).
#
# What is shipped: the runtime_env (RUNTIME_ENV)
#   image (default)  The nodes already have tspin-ray's dependencies installed in the Python that runs
#                    Ray: the image built from cluster/Dockerfile, or `pip install -e .` (plus
#                    `.[gpu]`/`.[cpu]`) in the same environment on every node. Nothing is pip-installed
#                    at submit time (no index needed, nothing to drift). Only the working directory is
#                    uploaded: WORKING_DIR (default: this repository) is zipped, stored in the cluster's
#                    GCS (size-capped: 512 MiB; keep it to source and configs), and unpacked on every node
#                    that runs the driver or an actor; each of those processes gets it as its current
#                    directory and at the front of PYTHONPATH. So the tspin_ray source in the checkout
#                    you submit from is the code that runs (it shadows the copy installed in the image),
#                    and CONFIG is resolved inside it. Left out of the upload: everything .gitignore
#                    lists (.venv/, runs/, *.egg-info/, bench/results/, ...), Ray's defaults (.git,
#                    .venv, venv, __pycache__), and the EXCLUDES below for checkouts without a .gitignore.
#   FILE.yaml|.json  Your own runtime_env file, passed as `--runtime-env FILE` (WORKING_DIR still becomes
#                    its working_dir). Use it for `pip:`/`uv:` (nodes that lack packages and can reach an
#                    index), `image_uri:`, `py_modules:` or `env_vars:` (e.g. NCCL_DEBUG). Do not set
#                    TOKENIZERS_PARALLELISM, HF_HUB_OFFLINE, VLLM_ENABLE_V1_MULTIPROCESSING or
#                    VLLM_CPU_KVCACHE_SPACE there: the driver sets them for its actors, and Ray 2.60
#                    refuses a job whose env_vars repeat a key the driver's ray.init sets.
#   WORKING_DIR=     (empty) ships nothing: the head's installed tspin-ray and its current directory are
#                    used, and CONFIG must be a path that exists on the head (e.g. /opt/tspin-ray/jobs/...
#                    in the cluster/Dockerfile image).
# Other knobs: PYTHON (the interpreter on the cluster nodes; default python), RAY (the local ray CLI;
# default: ray next to this script's .venv if present, else ray on PATH), ENTRYPOINT_CPUS (CPUs reserved
# for the driver process; default 0, like a KubeRay head with num-cpus 0).
set -euo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RAY=${RAY:-$([ -x "$REPO/.venv/bin/ray" ] && echo "$REPO/.venv/bin/ray" || echo ray)}
PYTHON=${PYTHON:-python}
RUNTIME_ENV=${RUNTIME_ENV:-image}
WORKING_DIR=${WORKING_DIR-$REPO}
ENTRYPOINT_CPUS=${ENTRYPOINT_CPUS:-0}
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
# A token without a mode: the CLI only sends the token in token mode.
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; }; then
  export RAY_AUTH_MODE=token
fi
# Never uploaded, whatever the working directory's .gitignore says (gitignore syntax, relative to it).
EXCLUDES='["/.git/", "/.venv/", "/venv/", "/runs/", "/out/", "/bench/results/", "*.egg-info/", "__pycache__/", ".pytest_cache/", ".ruff_cache/"]'

CONFIG="" WAIT=(); SUBMISSION_ID=${SUBMISSION_ID:-}; DRY=0; OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-wait) WAIT=(--no-wait) ;;
    --submission-id) [ $# -ge 2 ] || usage; SUBMISSION_ID=$2; shift ;;
    --submission-id=*) SUBMISSION_ID=${1#*=} ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "submit.sh: unknown option $1" >&2; usage ;;
    *) if [ -z "$CONFIG" ]; then CONFIG=$1; else OVERRIDES+=("$1"); fi ;;
  esac
  shift
done
[ -n "$CONFIG" ] || usage

# CONFIG as the driver will see it: relative to the shipped working directory when it lies inside it.
if [ -n "$WORKING_DIR" ]; then
  [ -f "$CONFIG" ] || { echo "submit.sh: config $CONFIG not found" >&2; exit 2; }
  WORKING_DIR=$(cd "$WORKING_DIR" && pwd)
  abs=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
  case "$abs" in
    "$WORKING_DIR"/*) CONFIG=${abs#"$WORKING_DIR"/} ;;
    *) echo "submit.sh: note: $CONFIG is outside $WORKING_DIR; the head node must have $abs" >&2
       CONFIG=$abs ;;
  esac
fi
case " ${OVERRIDES[*]-} " in
  *" output_dir="*) ;;
  *) echo "submit.sh: note: no output_dir=... override; the config's output_dir is used (it must be an" \
          "absolute path on shared storage for a multi-node cluster)" >&2 ;;
esac

ARGS=(--address "$RAY_ADDRESS" --entrypoint-num-cpus "$ENTRYPOINT_CPUS")
if [ "$RUNTIME_ENV" = image ]; then
  ARGS+=(--runtime-env-json "{\"excludes\": $EXCLUDES, \"env_vars\": {\"PYTHONUNBUFFERED\": \"1\"}}")
else
  [ -f "$RUNTIME_ENV" ] || { echo "submit.sh: RUNTIME_ENV must be 'image' or a runtime_env file" >&2; exit 2; }
  ARGS+=(--runtime-env "$RUNTIME_ENV")
fi
[ -z "$WORKING_DIR" ] || ARGS+=(--working-dir "$WORKING_DIR")
if [ -z "$SUBMISSION_ID" ]; then
  SUBMISSION_ID="tspin-$(basename "${CONFIG%.*}")-$(date +%Y%m%d-%H%M%S)-$RANDOM"
fi
ARGS+=(--submission-id "$SUBMISSION_ID" "${WAIT[@]}")

# The entrypoint as separate words: Ray 2.60's CLI shell-quotes each one (shlex.join) before the job
# server runs the line with /bin/sh, so overrides containing spaces or braces arrive intact, e.g.
# 'objective.overrides={-1: {beta: 5.0}}'.
ENTRY=("$PYTHON" -m tspin_ray train --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
echo "submission id: $SUBMISSION_ID"
if [ "$DRY" = 1 ]; then
  printf '%q ' "$RAY" job submit "${ARGS[@]}" -- "${ENTRY[@]}"; echo
  exit 0
fi
exec "$RAY" job submit "${ARGS[@]}" -- "${ENTRY[@]}"
