#!/usr/bin/env bash
# The commands that trained the bundled models, in order (run from the repository root, with
# ../shared/data present and the venv active). See models/README.md for what each step produced.
set -euo pipefail
D=../shared/data
W=${WORK:-/tmp/tinyllm-models}
mkdir -p "$W"
DROP="book=肉蒲团,灯草和尚,绣榻野史,痴婆子传,浓情快史,巫山艳史,杏花天,僧尼孽海,灯月缘,鸳鸯阵,妖狐艳史,玉楼春,飞花艳想,空空幻,金瓶梅,续金瓶梅,三续金瓶梅,姑妄言"
MIX=(--input $D/pretrain/classical_novels.jsonl.xz:0.25
     --input $D/pretrain/cmrc2017_children_stories.jsonl.gz:5
     --input $D/pretrain/tiny_chinese_stories_simplified.jsonl.gz:5
     --input $D/pretrain/cmrc2018_wiki_paragraphs.jsonl.gz:2)

# 1. tokenizer on the weighted mix (train documents only), then the token shards
tinyllm tokenizer train "${MIX[@]}" --drop-field-values "$DROP" --vocab-size 5000 --out "$W/tok"
tinyllm data prepare "${MIX[@]}" --drop-field-values "$DROP" --tokenizer "$W/tok/tok.model" --out "$W/data"

# 2. pretraining. The bundled run was planned for 3000 steps and, the shared machine being slower
#    than planned, resumed at step 300 with --max-steps 1500 (and OMP_NUM_THREADS=1, which beat two
#    threads while other work shared the cores); these two commands repeat that schedule (bit-exact
#    only with the same thread counts, which changed during the bundled run).
tinyllm pretrain --config configs/stories15M.toml --data-dir "$W/data" --out-dir "$W/pretrain" \
    --max-steps 3000 --lr 8e-4 --min-lr 8e-5 --warmup-steps 150 --eval-interval 250 --ckpt-interval 100 \
    --max-minutes 85 --stop-at-step 300
tinyllm pretrain --out-dir "$W/pretrain" --resume --max-steps 1500
# ...and once the machine was free, on to 2450 steps (a warm restart of the cosine schedule)
tinyllm pretrain --out-dir "$W/pretrain" --resume --max-steps 2450
# a later session went on (one thread, the other core serving builds and tests): planned 5400 steps,
# cut to 4600 at step 2800 so that SFT would fit the session (each a warm restart, decaying to 8e-5)
OMP_NUM_THREADS=1 tinyllm pretrain --out-dir "$W/pretrain" --resume --max-steps 5400 --stop-at-step 2800
OMP_NUM_THREADS=1 tinyllm pretrain --out-dir "$W/pretrain" --resume --max-steps 4600

# 2b. stories15M went on from the checkpoint above (here: from the bundled int8 file, as the later
#     session that did it had only that) on a mix with modern prose added and the classical novels down
#     to 0.05, read with the two fixes `tinyllm data prepare` now applies by default (a doubled opening
#     said once: "从前从前，" -> "从前，", which had taught the model to echo its prompt; t2s's 著 read as
#     the particle 着). The first phase ran on shards prepared before the 著 fix existed (add
#     --keep-t2s-zhe to repeat it exactly); the second phase on shards with both fixes.
M=$D/pretrain_modern
MIX2=(--input $D/pretrain/classical_novels.jsonl.xz:0.05
      --input $D/pretrain/cmrc2017_children_stories.jsonl.gz:5
      --input $D/pretrain/tiny_chinese_stories_simplified.jsonl.gz:5
      --input $D/pretrain/cmrc2018_wiki_paragraphs.jsonl.gz:2
      --input $M/c3_exam_passages.jsonl.xz:3
      --input $M/chinese_literature_ner_re_texts.jsonl.xz:2
      --input $M/drcd_wiki_paragraphs.jsonl.xz:1)
tinyllm convert models/stories15M.bin "$W/init.pt"   # rerunning from scratch: use "$W/pretrain/ckpt.pt" instead
tinyllm data prepare "${MIX2[@]}" --drop-field-values "$DROP" --tokenizer models/tok5000.model --out "$W/data2a" \
    --keep-t2s-zhe
OMP_NUM_THREADS=1 tinyllm pretrain --config configs/stories15M.toml --init-from "$W/init.pt" --data-dir "$W/data2a" \
    --out-dir "$W/pretrain2a" --max-steps 1200 --lr 3e-4 --min-lr 3e-5 --warmup-steps 60 --eval-interval 200 \
    --ckpt-interval 100 --max-minutes 90
tinyllm data prepare "${MIX2[@]}" --drop-field-values "$DROP" --tokenizer models/tok5000.model --out "$W/data2b"
OMP_NUM_THREADS=1 tinyllm pretrain --config configs/stories15M.toml --init-from "$W/pretrain2a/ckpt.pt" \
    --data-dir "$W/data2b" --out-dir "$W/pretrain2b" --max-steps 400 --lr 6e-5 --min-lr 1e-5 \
    --warmup-steps 20 --eval-interval 100 --ckpt-interval 50
tinyllm export --checkpoint "$W/pretrain2b/ckpt.pt" --format llama2c --version 2 --out models/stories15M.bin
tinyllm export --checkpoint "$W/pretrain2b/ckpt.pt" --format gguf --type q8_0 --tokenizer models/tok5000.model \
    --out models/stories15M_q8_0.gguf

# 3. SFT on instruction and dialogue data, identity claims of other assistants rewritten
S=$D/sft
tinyllm sft --checkpoint "$W/pretrain/ckpt.pt" --data $S/alpaca_chinese_52k.jsonl.gz --data $S/coig_cqia_subset.jsonl.gz \
    --data $S/kdconv_dialogues.jsonl.gz --data $S/llamafactory_alpaca_zh_demo.json --skip-bad \
    --tokenizer "$W/tok/tok.model" --out-dir "$W/sft" --batch-size 32 --max-steps 1200 --lr 3e-4 --min-lr 3e-5 \
    --warmup-steps 40 --eval-interval 200 --ckpt-interval 100

# 4. export (each export checks itself against the C runtime) and measure for the card; stories15M
#    itself now comes from step 2b (these two lines made the model 2b started from)
tinyllm export --checkpoint "$W/pretrain/ckpt.pt" --format llama2c --version 2 --out models/stories15M.bin
tinyllm export --checkpoint "$W/pretrain/ckpt.pt" --format gguf --type q8_0 --tokenizer "$W/tok/tok.model" \
    --out models/stories15M_q8_0.gguf
tinyllm export --checkpoint "$W/sft/ckpt.pt" --format llama2c --version 2 --out models/chat15M.bin
tinyllm export --checkpoint "$W/sft/ckpt.pt" --format gguf --type q8_0 --tokenizer "$W/tok/tok.model" \
    --out models/chat15M_q8_0.gguf
cp "$W/tok/tok.model" models/tok5000.model
cp "$W/tok/tok5000.bin" models/tok5000.bin
python models/measure.py

# 4b. Tried and not shipped (models/README.md, "Answer evaluation"): SFT of the continued stories15M (2b).
#     Its torch checkpoint was gone, so it starts from the bundled int8 file (rerunning from scratch:
#     "$W/pretrain2b/ckpt.pt" instead). Same data, order, seed and 2% val split as step 3 (so the same
#     held-out questions), each short QA (one question, an answer of at most 50 characters) three times per
#     pass; one thread, batch 16. Planned as 2,200 steps; the shared machine ran at 80-880 tokens/s, so it
#     was stopped and resumed with fewer steps (1,300 at step 110, then 1,000 at step 282: the cosine jumps to
#     the shorter schedule), then continued from step 1,000 to 1,600 (a warm restart: lr back to ~1.2e-4,
#     down to 3e-5 again). It writes beside the bundled files, not over them.
tinyllm convert models/stories15M.bin "$W/base2.pt"
SFT_DATA=(--data $S/alpaca_chinese_52k.jsonl.gz --data $S/coig_cqia_subset.jsonl.gz --data $S/kdconv_dialogues.jsonl.gz
          --data $S/llamafactory_alpaca_zh_demo.json)
OMP_NUM_THREADS=1 tinyllm sft --checkpoint "$W/base2.pt" "${SFT_DATA[@]}" --skip-bad --short-repeat 3 \
    --tokenizer models/tok5000.model --out-dir "$W/sft2" --batch-size 16 --max-steps 2200 --lr 3e-4 --min-lr 3e-5 \
    --warmup-steps 40 --eval-interval 200 --ckpt-interval 100 --max-minutes 100 --stop-at-step 110
OMP_NUM_THREADS=1 tinyllm sft --out-dir "$W/sft2" --resume --max-steps 1300 --stop-at-step 282
OMP_NUM_THREADS=1 tinyllm sft --out-dir "$W/sft2" --resume --max-steps 1000
cp "$W/sft2/ckpt.pt" "$W/sft2_step1000.pt"
OMP_NUM_THREADS=1 tinyllm sft --out-dir "$W/sft2" --resume --max-steps 1600
tinyllm export --checkpoint "$W/sft2_step1000.pt" --format llama2c --version 2 --out "$W/chat_sft2_step1000.bin"
tinyllm export --checkpoint "$W/sft2/ckpt.pt" --format llama2c --version 2 --out "$W/chat_sft2.bin"
cp models/tok5000.bin "$W/tok5000.bin"   # beside the exports, where ./run looks
# the answer evaluation of models/README.md (100 held-out questions of the SFT data's val split), for each model
for m in models/chat15M.bin "$W/chat_sft2_step1000.bin" "$W/chat_sft2.bin"; do
    tinyllm eval --model "$m" --answers $S/alpaca_chinese_52k.jsonl.gz --answers $S/coig_cqia_subset.jsonl.gz \
        --answers $S/kdconv_dialogues.jsonl.gz --answers $S/llamafactory_alpaca_zh_demo.json --max-new-tokens 64 \
        --answers-out "$W/$(basename "$m" .bin).answers.jsonl" --no-progress
done

# 5. DPO was tried and not shipped (see models/README.md): pairs from the demo set, 200 steps, on the chat15M
#    and SFT checkpoint of step 3
tinyllm dpo make-pairs --model models/chat15M.bin --data $S/llamafactory_alpaca_zh_demo.json \
    --tokenizer "$W/tok/tok.model" --out "$W/pairs.jsonl" --max-new-tokens 128 --seed 1 --threads 2
tinyllm dpo --checkpoint "$W/sft/ckpt.pt" --data "$W/pairs.jsonl" --tokenizer "$W/tok/tok.model" --out-dir "$W/dpo" \
    --beta 0.1 --batch-size 16 --max-steps 200 --lr 1e-5 --min-lr 1e-6 --warmup-steps 10 --eval-interval 50

# 6. Optional (ALIGN=1): DPO against RL (GRPO with a reward model) from the bundled chat15M, the worked example of
#    models/README.md ("Aligning chat15M"); neither result was shipped. One thread each, beside other work.
if [[ ${ALIGN:-0} == 1 ]]; then
A="$W/align"
mkdir -p "$A"
tinyllm convert models/chat15M.bin "$A/chat.pt" --tokenizer models/tok5000.model
# our pairs' prompts: single-turn conversations (answer 10-120 characters, question 4-100) of sft's own split,
# 5,000 from its train part and 200 from its val part (chat15M never trained on those)
python - "$A" <<'PY'
import json, random, sys
from tinyllm.eval import held_out_split
S = "../shared/data/sft/"
train, val = held_out_split([S + "alpaca_chinese_52k.jsonl.gz", S + "coig_cqia_subset.jsonl.gz",
                             S + "kdconv_dialogues.jsonl.gz", S + "llamafactory_alpaca_zh_demo.json"])
def keep(c):
    return (len(c) == 2 and c[0]["role"] == "user" and c[1]["role"] == "assistant"
            and 10 <= len(c[1]["content"]) <= 120 and 4 <= len(c[0]["content"]) <= 100)
tr, va = [c for c in train if keep(c)], [c for c in val if keep(c)]
rng = random.Random(7)
rng.shuffle(tr); rng.shuffle(va)
for name, rows in (("src_train", tr[:5000]), ("src_heldout", va[:200])):
    with open(f"{sys.argv[1]}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in rows)
PY
for part in train:1001 heldout:1; do
    OMP_NUM_THREADS=1 tinyllm dpo make-pairs --model models/chat15M.bin --data "$A/src_${part%%:*}.jsonl" \
        --tokenizer models/tok5000.model --out "$A/pairs_${part%%:*}_raw.jsonl" --max-new-tokens 128 \
        --temperature 0.7 --seed "${part##*:}" --threads 1
done
# length-matched pairs only (chosen 0.7x to 1.4x the rejected's characters); held out: the first 50 of the val
# part and 15 of the 300 shared pairs; the held-out prompts and their reference answers (bits/char) from the 50
python - "$A" <<'PY'
import json, random, sys
A = sys.argv[1]
def read(p): return [json.loads(l) for l in open(p, encoding="utf-8")]
def write(p, rows):
    with open(f"{A}/{p}", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
def matched(r): return 0.7 <= len(r["chosen"]) / max(1, len(r["rejected"])) <= 1.4
own = [r for r in read(f"{A}/pairs_train_raw.jsonl") if matched(r)]
held = [r for r in read(f"{A}/pairs_heldout_raw.jsonl") if matched(r)][:50]
shared = json.load(open("../shared/data/dpo/llamafactory_dpo_zh_demo.json", encoding="utf-8"))
order = list(range(len(shared)))
random.Random(7).shuffle(order)
write("own_train.jsonl", own); write("own_heldout.jsonl", held)
write("shared_train.jsonl", [shared[i] for i in order[15:]]); write("shared_heldout.jsonl", [shared[i] for i in order[:15]])
write("rl_prompts.jsonl", [{"prompt": r["prompt"]} for r in own])
write("heldout_prompts.jsonl", [{"prompt": r["prompt"]} for r in held])
with open(f"{A}/heldout_answers.txt", "w", encoding="utf-8") as f:
    f.write("\n\n".join(r["chosen"].replace("\n\n", "\n") for r in held) + "\n")
PY
TRAIN_PAIRS=(--data "$A/own_train.jsonl" --data "$A/shared_train.jsonl")
# the reward model (LoRA rank 16): planned for 150 steps, stopped at step 54 for time; best.pt is step 50
OMP_NUM_THREADS=1 tinyllm reward train --checkpoint "$A/chat.pt" "${TRAIN_PAIRS[@]}" --tokenizer models/tok5000.model \
    --out-dir "$A/rm" --lora-rank 16 --lr 2e-3 --min-lr 2e-4 --warmup-steps 10 --max-steps 150 --batch-size 16 \
    --eval-interval 50 --ckpt-interval 50 --no-compile --stop-at-step 54
for h in own shared; do tinyllm reward score --checkpoint "$A/rm" --data "$A/${h}_heldout.jsonl" --out "$A/rm_${h}_heldout.jsonl"; done
# DPO: planned for 150 steps, stopped at step 100 for time
OMP_NUM_THREADS=1 tinyllm dpo --checkpoint "$A/chat.pt" "${TRAIN_PAIRS[@]}" --tokenizer models/tok5000.model --out-dir "$A/dpo" \
    --beta 0.1 --lr 1e-5 --min-lr 1e-6 --warmup-steps 10 --max-steps 150 --batch-size 16 --eval-interval 50 \
    --ckpt-interval 50 --no-compile --stop-at-step 100
# GRPO on the held-in prompts with the reward model: 40 steps of 4 prompts x 4 answers
OMP_NUM_THREADS=1 tinyllm rl --checkpoint "$A/chat.pt" --prompts "$A/rl_prompts.jsonl" --reward-model "$A/rm/best.pt" \
    --tokenizer models/tok5000.model --group-size 4 --batch-size 4 --max-new-tokens 96 --beta 0.05 --clip 0.2 \
    --temperature 0.8 --lr 2e-5 --min-lr 2e-6 --warmup-steps 5 --max-steps 40 --ckpt-interval 10 --threads 1 \
    --log-interval 1 --out-dir "$A/rl" --no-compile
for m in dpo rl; do
    tinyllm export --checkpoint "$A/$m/ckpt.pt" --format llama2c --version 2 --out "$A/${m}15M.bin" --tokenizer models/tok5000.bin
done
# every model measured the same way: bits/char on the held-out references and the card's modern val documents,
# reward of its answers to the held-out prompts (seed 1 at t 0.7, and greedy), the five sample questions
python -c "import json, sys; sys.path.insert(0, 'models'); from measure import heldout_texts
open('$A/modern_val.jsonl', 'w').writelines(json.dumps({'text': t}, ensure_ascii=False) + '\n' for t in heldout_texts()['modern'])"
for m in models/chat15M.bin "$A/dpo15M.bin" "$A/rl15M.bin"; do
    n=$(basename "$m" .bin)
    tinyllm eval --model "$m" --tokenizer models/tok5000.bin --text "$A/heldout_answers.txt" --out "$A/$n.bpc_answers.json"
    tinyllm eval --model "$m" --tokenizer models/tok5000.bin --text "$A/modern_val.jsonl" --out "$A/$n.bpc_modern.json"
    for t in 0.7 0; do
        tinyllm eval --model "$m" --tokenizer models/tok5000.bin --prompts "$A/heldout_prompts.jsonl" --temperature $t \
            --seed 1 --max-new-tokens 128 --generations-out "$A/$n.gen$t.jsonl" --out /dev/null
        python -c "import json, sys; [print(json.dumps({'prompt': r['prompt'], 'answer': r['output']}, ensure_ascii=False))
                   for r in map(json.loads, open(sys.argv[1]))]" "$A/$n.gen$t.jsonl" > "$A/$n.answers$t.jsonl"
        tinyllm reward score --checkpoint "$A/rm" --data "$A/$n.answers$t.jsonl" --out "$A/$n.scored$t.jsonl"
    done
    i=0
    for q in 中国的首都是哪里？ 请介绍一下你自己。 怎样才能保持健康？ 给我讲一个关于小猫的故事。 天空为什么是蓝色的？; do
        i=$((i + 1)); echo "$q" | ./run "$m" -z models/tok5000.bin -m chat -t 0.7 -s $i -n 200 -j 1
    done
done
# and the answer evaluation of "Answer evaluation (chat models)" above
for m in "$A/dpo15M.bin" "$A/rl15M.bin"; do
    tinyllm eval --model "$m" --tokenizer models/tok5000.bin --answers $S/alpaca_chinese_52k.jsonl.gz \
        --answers $S/coig_cqia_subset.jsonl.gz --answers $S/kdconv_dialogues.jsonl.gz \
        --answers $S/llamafactory_alpaca_zh_demo.json --max-new-tokens 64 --answers-out "${m%.bin}.answers.jsonl"
done
fi

# 7. Tried and not shipped (models/README.md, "A mixture-of-experts story model against the dense one"):
#    configs/stories15M-moe.toml against configs/stories15M at equal CPU time, both from scratch on the
#    shards of step 2b ("$W/data2b"), side by side, one thread each. MOE=1 bash models/recipe.sh repeats it
#    (the second command of each: the step counts the first 17.6 minutes' rates fit into 30 minutes).
if [ "${MOE:-0}" = 1 ]; then
for run in dense:configs/stories15M.toml:740 moe:configs/stories15M-moe.toml:342; do
    IFS=: read -r name cfg steps <<< "$run"
    ( OMP_NUM_THREADS=1 tinyllm pretrain --config "$cfg" --data-dir "$W/data2b" --out-dir "$W/cal_$name" \
          --batch-size 16 --max-steps 2000 --lr 8e-4 --min-lr 8e-5 --warmup-steps 50 --eval-interval 100 \
          --eval-steps 10 --ckpt-interval 100 --max-minutes 17.6
      OMP_NUM_THREADS=1 tinyllm pretrain --out-dir "$W/cal_$name" --resume --max-steps "$steps" ) &
done
wait
fi

# 8. The recipe study (models/study.jsonl, models/README.md "Recipe study"): short runs, one thread each, two
#    side by side, compared by held-out bits/char per source (`python models/measure.py --per-source`).
#    STUDY=1 bash models/recipe.sh repeats it. The mixes keep the sources of MIX2 in its order (a document's
#    split follows its source's place, so the same documents stay held out) and append the rest.
if [ "${STUDY:-0}" = 1 ]; then
MIX3=(--input $D/pretrain/classical_novels.jsonl.xz:0.03
      --input $D/pretrain/cmrc2017_children_stories.jsonl.gz:8
      --input $D/pretrain/tiny_chinese_stories_simplified.jsonl.gz:8
      --input $D/pretrain/cmrc2018_wiki_paragraphs.jsonl.gz:3
      --input $M/c3_exam_passages.jsonl.xz:4
      --input $M/chinese_literature_ner_re_texts.jsonl.xz:2
      --input $M/drcd_wiki_paragraphs.jsonl.xz:2)
MIX3B=("${MIX3[@]}" --input $M/csl_abstracts.jsonl.xz:1 --input $M/howtocook.jsonl.xz:1 --input $M/oi_wiki.jsonl.xz:0.5
       --input $M/d2l_zh.jsonl.xz:1 --input $M/wangdoc_javascript_tutorial.jsonl.xz:0.5
       --input $M/python_docs_zh_cn.jsonl.xz:0.2 --input $M/lawrefbook_laws.jsonl.xz:0.05
       --input $M/debian_docs_zh_cn.jsonl.xz:0.5)
study() {  # name, then pretrain flags
    local name=$1; shift
    OMP_NUM_THREADS=1 tinyllm pretrain --config configs/stories15M.toml --out-dir "$W/study/$name" --eval-interval 100 \
        --ckpt-interval 100 --no-progress "$@"
}
mkdir -p "$W/study"
tinyllm convert models/stories15M.bin "$W/study/init.pt" --tokenizer models/tok5000.model
tinyllm data prepare "${MIX3[@]}" --drop-field-values "$DROP" --tokenizer models/tok5000.model --out "$W/data3"
tinyllm data prepare "${MIX3B[@]}" --drop-field-values "$DROP" --tokenizer models/tok5000.model --out "$W/data3b"
for v in 5000 8000 12000; do
    tinyllm tokenizer train "${MIX3B[@]}" --drop-field-values "$DROP" --vocab-size $v --out "$W/tok3b_$v"
    tinyllm data prepare "${MIX3B[@]}" --drop-field-values "$DROP" --tokenizer "$W/tok3b_$v/tok.model" \
        --out "$W/data3b_tok$v"
done
C=(--init-from "$W/study/init.pt" --data-dir "$W/data3" --lr 3e-4 --min-lr 3e-5 --warmup-steps 20 --max-steps 330)
study A_mix3_lr3e-4 "${C[@]}" & study B_mix3_lr3e-4_drop0.1 "${C[@]}" --dropout 0.1 --max-minutes 14 & wait
T=(--lr 1e-3 --min-lr 1e-4 --warmup-steps 30 --max-minutes 11)  # --max-steps: what 11 minutes held at each size
study T_scratch_tok5000new "${T[@]}" --data-dir "$W/data3b_tok5000" --max-steps 344 &
study T_scratch_tok8000new "${T[@]}" --data-dir "$W/data3b_tok8000" --max-steps 308 & wait
study T_scratch_tok12000new "${T[@]}" --data-dir "$W/data3b_tok12000" --max-steps 270 &
study T_scratch_tok5000old "${T[@]}" --data-dir "$W/data3b" --max-steps 344 & wait
python models/measure.py --per-source "$W/study/init.pt" "$W"/study/A_*/ckpt.pt "$W"/study/B_*/ckpt.pt \
    --tokenizer models/tok5000.model
for v in 5000 8000 12000; do
    python models/measure.py --per-source "$W/study/T_scratch_tok${v}new/ckpt.pt" --tokenizer "$W/tok3b_$v/tok.model"
done
python models/measure.py --per-source "$W/study/T_scratch_tok5000old/ckpt.pt" --tokenizer models/tok5000.model
fi
