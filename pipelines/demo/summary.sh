#!/bin/sh
# The end of `make demo`: where the outputs are, the figures worth a look, and what to open next.
# Only reads; the figures come from the files themselves, so they are the run's, not promises.
#
#   BUILD=build pipelines/demo/summary.sh
set -eu

build=${BUILD:-build}
w=pipelines/demo/work
cd "$(dirname "$0")/../.."

shard="" teachers=""
for f in "$w"/teacher*.h5; do
    [ -e "$f" ] || continue
    shard=${shard:-$f}
    teachers="$teachers ${f##*/}"
done
aligned=$("$build/essence-inspect" $w/student.h5 2>/dev/null | sed -n 's/^aligned: //p')
# The last evaluation line of metrics.jsonl: {"step":150,"eval_latent_mse":...,"eval_r2":...}
last_eval=$(grep eval_latent_mse $w/aligned/metrics.jsonl 2>/dev/null | tail -n 1 |
       sed 's/.*"step":\([0-9]*\).*"eval_latent_mse":\([^,]*\).*"eval_const_mse":\([^,]*\),"eval_r2":\([^,}]*\).*/step \1: held-out latent MSE \2 (constant baseline \3, R² \4)/')

# The summary line of eval.jsonl: accuracy with its interval, and the notes' cross entropy
evaluated=$(tail -n 1 $w/eval.jsonl 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
g, t = s["generate"], s["text"]
low, high = g["wilson95"]
print("%d/%d answers right (95%% interval %.2f..%.2f); notes: mean CE %.3f" % (g["correct"], g["samples"], low, high, t["mean_ce"]))
' 2>/dev/null || true)

cat <<EOF

make demo: done. Everything it made is under $w/:
  models/teacher/, models/student/  random-weight checkpoints (essence-inspect mkmodel), tokenizers
  data/texts.jsonl                  $(wc -l < $w/data/texts.jsonl) reasoning samples (gen_corpus.py)
  ${teachers# }
                                    extract: the teacher's layers 1 and 2 (bf16, zstd)
  student.h5                        project: Fourier-feature targets at the student's width;
                                    aligned: ${aligned:-?}
  aligned/                          align: the trained student (transformers' from_pretrained loads it);
                                    ${last_eval:-no evaluation found}
  eval.jsonl                        eval: $(wc -l < $w/data/tasks.jsonl 2>/dev/null || echo 0) records of data/tasks.jsonl;
                                    ${evaluated:-no summary found}

Open next:
  $build/essence-inspect ${shard:-$w/teacher.h5}
  $build/essence-inspect stats ${shard:-$w/teacher.h5}
  $build/essence-inspect $w/student.h5
  $w/aligned/loss.png
  $build/essence-run pipelines/demo.yaml status
  $build/essence-run pipelines/demo.yaml run --set project.sigma=3.5    # re-runs project and align
EOF
