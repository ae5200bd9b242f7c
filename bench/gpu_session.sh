#!/usr/bin/env bash
# The GPU runs, in stages that each fit one device call (10 minutes at most;
# a session has ~30 minutes of device time, and every call may start a fresh
# machine, so each call installs what it needs first, ~30 s).
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]
#
#   tests         the whole test suite on 14 workers (pytest-xdist): the
#                 tests marked cuda or triton first, so they finish even if
#                 the rest runs out of time; failures in full in tests.log
#                 (<= 540 s, the whole call: 522 tests took 305 s on an
#                 H100, and there are 683 now)
#   tests:EXPR    the tests that pytest -k EXPR selects, the same way
#   cudatests     only the tests marked cuda or triton (~120 of ~760 on a
#                 GPU, the CUDA cases of the device-parametrized property
#                 tests included): the part CI cannot run     (<= 300 s)
#   rotary        the rotary kernel benchmarks                 (<= 200 s)
#   rotary:EXPR   the rotary benchmarks that pytest -k EXPR selects
#   norm          the dropout + add + LayerNorm benchmarks: wmfast's Triton
#                 kernels against Inductor's and eager, one add & norm and
#                 both of a d_mlp 0 layer (bias_ffn_norms)        (<= 270 s)
#   profile       torch.profiler's kernel table of the SIR bf16 training step,
#                 torch.compile(reference) beside fast and fast_torch_norm
#                                                              (<= 200 s)
#   host          cProfile of the "small" bf16 training step's host work,
#                 torch.compile(reference) beside fast and fast_torch_norm
#                                                              (<= 120 s)
#   tools         tools/fused_path_diff.py                      (<= 30 s)
#   probe         tools/rotary_grad_probe.py: the rotary model's gradients
#                 per way of running its embedding rotation, at the check's
#                 loss scale                                     (<= 150 s)
#   fp64          tools/fp64_grad_errors.py: fast's and the fp32 reference's
#                 distance from fp64 at wmfast check's size      (<= 200 s)
#   tune          tools/rotary_tune.py, tools/layer_norm_tune.py and
#                 tools/bias_ffn_norms_tune.py: the kernels' launch
#                 settings swept                               (<= 420 s)
#   check         wmfast check on CUDA, fp32 and bf16: the JSON reports
#   check:DTYPE   the same in one dtype
#                                                              (<= 300 s)
#   determinism   set_deterministic's cost, bitwise reruns     (<= 150 s)
#   compile       cold and warm compile time, new processes    (<= 450 s)
#   overhead      host overhead per call on a tiny model: fast's runner
#                 against torch.compile(reference)             (<= 120 s)
#   models:EXPR   the model benchmarks that pytest -k EXPR selects, with what
#                 is left of the call (each case compiles: ~20-40 s per
#                 compiled impl, so select a few groups per call)
#
# The calls of one session, in priority order. Done on H100s (bench/results/
# README.md): "h100" and "h100-2" (2026-11-23), "h100-3" (2026-11-23: the
# probe, wmfast check fp32 and bf16, fp64 distances, the bf16 training steps
# and forwards at both shapes, rotary, add & norm, determinism, overhead).
# Next, with 15 minutes of device time (a session's budget since 2026-12;
# a fresh machine's start counts): two calls, the correctness one first.
#   A. cudatests "rotary:fwdbwd and sir"   (WMFAST_CALL_LIMIT=420: the CUDA
#      and Triton tests, then the SIR rotary fwd+bwd rows with
#      wmfast_launchers and liger_autograd, as in 3. below; new since
#      "h100-3" among the CUDA tests: the state machines of
#      test_fast_user_sequences.py uncompiled on CUDA, and the wrappers'
#      training loop under CUDA graphs, test_training.py)
#   B. "models:sir and bf16 and train_step and rotary_qk and (torch_compile
#      or fast) and not torch_norm and not cudagraphs and not cpp"
#      (WMFAST_CALL_LIMIT = what is left minus ~60 s: does rotary_qk reach
#      1.2x torch.compile with the packed gradient and the fused norms, and
#      what does each give, as in 2. below)
# With 30 minutes, the calls below in order:
#   1. tests   (the whole suite on CUDA, after the rule changes and the
#      fused d_mlp 0 norms: bias_ffn_norms' kernels have only run under the
#      interpreter and through ptxas)
#   2. norm "rotary:packed" "models:sir and bf16 and train_step and
#      transformer and (fast or torch_compile)"   (bias_ffn_norms against two
#      single passes, rotary_qkv_packed against rotary_qk + autograd's stack,
#      then the SIR steps with fast, fast_single_norms, fast_unpacked_rotary
#      and fast_torch_norm: do the two pay, does rotary_qk reach 1.2x
#      torch.compile)
#   3. tune "rotary:fwdbwd and sir"   (bias_ffn_norms' launch settings are
#      ptxas-informed guesses; rotary_tune prints the eager op's host time
#      and cProfile's top functions, and the benchmark's wmfast_launchers
#      row times our kernels as liger's row times its own, liger_autograd
#      liger's op through autograd as wmfast_triton times ours: is the SIR
#      bf16 fwd+bwd miss against liger host work, as the CPU estimate says?)
#   4. compile "models:fp32"   (not yet run on a GPU)
#   5. overhead host "models:small and (rnn or lstm)"   (where fast's extra
#      host time on a launch-bound step goes: "h100-3" measured 4.96 ms a
#      tiny training step against torch.compile's 4.21, and at the small
#      shape fast lost to torch.compile for None, standard and rotary_qk;
#      bench_overhead's new rows split it between the runner and the
#      user-defined Triton kernels' launcher; on the CPU the runner's own
#      work before the compiled call measured ~126 us, the size of that gap
#      (bench/results/README.md, stop 26); the tiny RNN/LSTM rows check
#      that their runner costs ~nothing; then RNN/LSTM at the small shape;
#      the new fast_compiled_cpp_wrapper row: does Inductor's C++ wrapper,
#      which launches every kernel from C++, shrink that host time?)
#   6. "models:small and bf16 and train_step and (None or rotary_qk) and
#      (torch_compile or fast) and not norm and not unpacked and not
#      cudagraphs"   (the small step with the C++ wrapper, fast_cpp_wrapper:
#      does it reach >= 2.5x the reference without CUDA graphs? If so, it
#      becomes a FastOptions setting; its first compile is longer and
#      AOTAutograd's cache does not apply to it)
# A session has 30 minutes of device time; a fresh machine takes ~30 s to
# start and stays warm 30 s after a call, so a call made at once after the
# last one skips both the start and the setup. Set WMFAST_CALL_LIMIT (seconds)
# below 570 when less device time is left than a whole call.
#
# Before the first call, on the development machine (once per checkout):
#   mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/ && echo /.whl/ >> .git/info/exclude
# With the device tool:  run(command="bash bench/gpu_session.sh tests rotary", carry=[".whl"])
# Results come back under $OUT (versions.txt, tests.log, bench_*.json and
# partial.jsonl, which holds every result as it finished, also of a stage that
# ran out of time). Then:
#   python bench/report.py <files>/bench_*.json <files>/partial.jsonl --out bench/results/<device>-<what>
# (report.py drops the duplicates of a result found in both).
set -uo pipefail
OUT="${OUT:-/tmp/wmfast-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export WMFAST_HYPOTHESIS_PROFILE=ci
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
export WMFAST_BENCH_PARTIAL="$OUT/partial.jsonl"
# seconds: leave the device call room to send $OUT back (lower it when less
# device time is left than a whole call)
CALL_LIMIT=${WMFAST_CALL_LIMIT:-570}

left() { echo $((CALL_LIMIT - SECONDS)); }
budget() { # the smaller of a stage's own limit and what is left of the call
  local own=$1 rest
  rest=$(left)
  echo $((own < rest ? own : rest))
}

export PYTHONPATH=/tmp/site

setup() { # skipped on a machine still warm from the previous call
  if ! python3 -c "import wmfast, nnsight" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  fi
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  } | tee "$OUT/versions.txt"
}

run_pytest() { # run_pytest SECONDS ARGS...: pytest under a timeout, never past the call
  local seconds
  seconds=$(budget "$1")
  shift
  if ((seconds < 30)); then
    echo "skipped (only ${seconds}s left in this call): pytest $*"
    return 0
  fi
  # SIGINT first: pytest then still prints its summary (the failures so far)
  timeout -s INT -k 20 "$seconds" python3 -m pytest -q -p no:cacheprovider "$@"
}

setup
for stage in "$@"; do
  echo "== $stage ($(left)s left)"
  if (($(left) < 20)); then # (timeout reads 0 as "no limit" and a negative as an error)
    echo "skipped: the call's time is up"
    continue
  fi
  case "$stage" in
    tests | tests:*)
      expr=${stage#tests}
      for marks in "cuda or triton" "not (cuda or triton)"; do
        run_pytest 540 tests -n 14 -rfE --tb=short -m "$marks" ${expr:+-k "${expr#:}"} \
          >>"$OUT/tests.log" 2>&1
      done
      tail -40 "$OUT/tests.log"
      ;;
    cudatests)
      run_pytest 300 tests -n 14 -rfE --tb=short -m "cuda or triton" >>"$OUT/tests.log" 2>&1
      tail -40 "$OUT/tests.log"
      ;;
    rotary | rotary:*)
      run_pytest 200 bench/bench_rotary.py --benchmark-only -k "${stage#rotary:}" \
        --benchmark-json="$OUT/bench_rotary.json" 2>&1 | tail -5
      ;;
    norm)
      run_pytest 120 bench/bench_layer_norm.py --benchmark-only \
        --benchmark-json="$OUT/bench_layer_norm.json" 2>&1 | tail -5
      run_pytest 150 bench/bench_bias_ffn_norms.py --benchmark-only \
        --benchmark-json="$OUT/bench_bias_ffn_norms.json" 2>&1 | tail -5
      ;;
    host)
      timeout -s INT "$(budget 120)" python3 -m bench.profile_step --host --shape small \
        --out "$OUT/host.txt" --impls torch_compile fast fast_torch_norm
      ;;
    tools)
      timeout "$(budget 30)" python3 tools/fused_path_diff.py >"$OUT/tools.txt" 2>&1
      tail -40 "$OUT/tools.txt"
      ;;
    probe)
      timeout "$(budget 150)" python3 tools/rotary_grad_probe.py >"$OUT/probe.txt" 2>&1
      tail -8 "$OUT/probe.txt"
      ;;
    fp64)
      timeout "$(budget 200)" python3 tools/fp64_grad_errors.py >"$OUT/fp64.txt" 2>&1
      grep -v -i warn "$OUT/fp64.txt" | tail -10
      ;;
    tune)
      {
        timeout "$(budget 120)" python3 tools/rotary_tune.py
        timeout "$(budget 180)" python3 tools/layer_norm_tune.py
        timeout "$(budget 120)" python3 tools/bias_ffn_norms_tune.py
      } >"$OUT/tune.txt" 2>&1
      tail -20 "$OUT/tune.txt"
      ;;
    profile)
      timeout -s INT "$(budget 200)" python3 -m bench.profile_step --out "$OUT/profile.txt" \
        --impls torch_compile fast fast_torch_norm
      ;;
    check | check:*)
      dtypes=${stage#check}
      dtypes=${dtypes#:}
      for dtype in ${dtypes:-fp32 bf16}; do
        timeout "$(budget 150)" python3 -m wmfast check --device cuda --dtype "$dtype" \
          --json "$OUT/check_$dtype.json" 2>&1 | tail -12
      done
      ;;
    determinism)
      run_pytest 150 bench/bench_determinism.py --benchmark-only \
        --benchmark-json="$OUT/bench_determinism.json" 2>&1 | tail -5
      ;;
    compile)
      run_pytest 450 bench/bench_compile.py --benchmark-only \
        --benchmark-json="$OUT/bench_compile.json" 2>&1 | tail -5
      ;;
    overhead)
      run_pytest 120 bench/bench_overhead.py --benchmark-only \
        --benchmark-json="$OUT/bench_overhead.json" 2>&1 | tail -5
      ;;
    models:*)
      run_pytest 570 bench/bench_models.py --benchmark-only -k "${stage#models:}" \
        --benchmark-json="$OUT/bench_models.json" 2>&1 | tail -5
      ;;
    *)
      echo "unknown stage: $stage (tests[:EXPR], cudatests, rotary[:EXPR], norm, profile, host, tools, probe, fp64, tune, check, determinism, compile, overhead, models:EXPR)"
      exit 2
      ;;
  esac
done
ls -la "$OUT"
