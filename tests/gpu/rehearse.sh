#!/usr/bin/env bash
# Rehearses tests/gpu/run.sh here, without a GPU, before device time is spent on it: the carry made
# as tests/gpu/prepare.sh makes it, but from the CUDA backend built for the host (build/emu/,
# tests/emulate/) and the checks linked with it; a stand-in nvidia-smi; run.sh's sections that fit a
# CPU (checks, programs: the benchmarks are sized for a GPU) and its summary. What fails here is
# run.sh's plumbing or the backend's logic; what passes says nothing of a GPU's behaviour or speed.
# Needs ../shared (as prepare.sh) and make deps' .venv (numpy for the parity scripts). Results in
# gpu-rehearsal-out/ (checks.txt, summary.md). Slow: run.sh's programs are sized for a GPU (on 2 cores
# the checks take ~1 minute, the programs section over two hours, essence-align's runs most of it);
# SECTIONS=checks picks the quick part.
set -eu
cd "$(dirname "$0")/../.."
CARRY=gpu-rehearsal
OUT=$PWD/gpu-rehearsal-out
EMULATED=1 CARRY=$CARRY bash tests/gpu/prepare.sh
rm -rf "$CARRY/libs" "$CARRY/ompi" "$OUT" && mkdir -p "$CARRY/stand-in" "$OUT"
cat >"$CARRY/stand-in/nvidia-smi" <<'SMI'
#!/bin/sh
# nvidia-smi's two answers run.sh reads, for the emulated device
case "$*" in
*-L*) echo "GPU 0: CUDA emulated on the host (UUID: GPU-emulated)" ;;
*) echo "CUDA emulated on the host, none, 0 MiB" ;;
esac
SMI
chmod +x "$CARRY/stand-in/nvidia-smi"
rc=0
PATH=$PWD/$CARRY/stand-in:$PWD/.venv/bin:$PATH OUT=$OUT CARRY=$CARRY SECTIONS=${SECTIONS:-"checks programs"} BUDGET=36000 \
    bash tests/gpu/run.sh || rc=$?
# what the device hands back from $OUT: at most 8 plain files, 16 MiB each, 2 folders down
files=$(find "$OUT" -type f | wc -l) big=$(find "$OUT" -type f -size +16M | wc -l) deep=$(find "$OUT" -mindepth 4 | wc -l)
if [ "$files" -gt 8 ] || [ "$big" -gt 0 ] || [ "$deep" -gt 0 ]; then
    echo "FAIL rehearse: $OUT holds $files files ($big over 16 MiB, $deep entries too deep): the device would not hand them all back"
    exit 1
fi
echo "rehearse: $OUT holds $files files, as the device hands them back"
exit $rc
