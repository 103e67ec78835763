#!/usr/bin/env bash
# One GPU session: install apt_hal into the machine's own Python (offline), run the GPU tests and
# the benchmarks, and keep every log under $OUT (or ./gpu-out). Used for every GPU figure that
# docs/benchmarks.md reports.
#
#   bash benchmarks/gpu_session.sh env tests:"tests/test_cuda_triton_rotary.py" bench:"rotary paged" overhead
#
# Stages run in the order given: env, tests:"FILES", bench:"OPS" (add quick to the list for
# --quick), overhead, models, gpt-oss, issue16 (bench:fp4_matmul, models and gpt-oss in turn),
# conformance. Wheels under .whl/ (e.g. gemlite for the fp4_matmul table) are installed first.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$OUT/wheels.log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    # An image whose setuptools is too old for pyproject metadata: lay the package out by hand.
    echo "pip install -e failed (see install.log); using a symlinked layout" | tee -a "$OUT/install.log"
    site=/tmp/apt_hal_site
    rm -rf "$site" && mkdir -p "$site/apt_hal"
    cp -r apt_hal/. "$site/apt_hal/"
    for d in backends models compile conformance; do ln -s "$PWD/$d" "$site/apt_hal/$d"; done
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

for stage in "$@"; do
    echo "=== $stage ==="
    case "$stage" in
        env)
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
            python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
            python3 -m apt_hal.cli info
            ;;
        tests:*)
            python3 -m pytest -q -x -p no:cacheprovider ${stage#tests:} 2>&1 | tee -a "$OUT/tests.log" | tail -25
            ;;
        bench:*)
            ops=${stage#bench:}
            quick=""
            [[ " $ops " == *" quick "* ]] && quick="--quick" && ops=${ops//quick/}
            python3 -m benchmarks.bench_ops --ops $ops $quick --markdown "$OUT/bench_$(echo $ops | tr ' ' '_').md" 2>&1 | tee -a "$OUT/bench.log"
            ;;
        overhead)
            python3 benchmarks/overhead.py 2>&1 | tee -a "$OUT/overhead.log"
            ;;
        models)
            python3 -m benchmarks.models --markdown "$OUT/models.md" 2>&1 | tee -a "$OUT/models.log"
            ;;
        gpt-oss)
            python3 -m benchmarks.gpt_oss_shape --markdown "$OUT/gpt_oss_shape.md" 2>&1 | tee -a "$OUT/gpt_oss_shape.log"
            ;;
        issue16)
            bash "$0" bench:fp4_matmul models gpt-oss
            ;;
        conformance)
            python3 -m apt_hal.cli conformance --backend all --report "$OUT/conformance" 2>&1 | tee -a "$OUT/conformance.log" | tail -40
            ;;
        *)
            echo "unknown stage $stage" >&2
            ;;
    esac
done
