"""Writes the bundled sample ChatML conversations (deterministic, offline).

    python scripts/make_sample_data.py [OUT_DIR [EVAL_DIR]]   # default: data/sample data/sample_eval

Two files whose extra fields differ, as real data gathered from several tools does:
  - chat_en.jsonl: English, single- and multi-turn, some with a system prompt; extra fields
    `id` (int) and `source` (str).
  - chat_zh.json: Chinese and mixed, a JSON array; extra fields `uid` (str), `tags` (list) and a
    per-message `name` on some turns.
The conversations follow small patterns (arithmetic, capitals, colours, greetings, counting) so a
tiny model visibly learns them within a CPU demo.

And a generation set, EVAL_DIR/questions.jsonl (`--eval_generation_files`, `--eval_answer_match contains`):
single questions in the conversations' patterns (capitals, colours, counting) with the reference
answer, outside the training files. The demo scores the model on it before and after training.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Chile", "Santiago"),
]
CAPITALS_ZH = [("法国", "巴黎"), ("日本", "东京"), ("意大利", "罗马"), ("西班牙", "马德里"), ("埃及", "开罗"), ("中国", "北京")]
COLOURS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow")]
COLOURS_ZH = [("天空", "蓝色"), ("草", "绿色"), ("雪", "白色"), ("煤", "黑色"), ("香蕉", "黄色")]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly."]
SYSTEMS_ZH = ["你是一个乐于助人的助手。", "请简洁地回答问题。"]


def english_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(1, 20), rng.randrange(1, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        country, city = rng.choice(CAPITALS)
        return f"What is the capital of {country}?", f"The capital of {country} is {city}."
    if kind == 2:
        thing, colour = rng.choice(COLOURS)
        return f"What colour is {thing}?", f"The colour of {thing} is {colour}."
    n = rng.randrange(2, 6)
    return f"Count from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + "."


def chinese_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(1, 20), rng.randrange(1, 20)
        return f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"
    if kind == 1:
        country, city = rng.choice(CAPITALS_ZH)
        return f"{country}的首都是哪里？", f"{country}的首都是{city}。"
    thing, colour = rng.choice(COLOURS_ZH)
    return f"{thing}是什么颜色？", f"{thing}是{colour}的。"


def conversation(rng: random.Random, turn_fn, systems: list[str]) -> list[dict]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(systems)})
    for _ in range(1 if rng.random() < 0.6 else rng.randrange(2, 4)):
        question, answer = turn_fn(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def generation_questions() -> list[dict]:
    """The demo's generation set: one question per fact, the answer as `contains` checks it."""
    questions = [{"prompt": f"What is the capital of {country}?", "answer": city} for country, city in CAPITALS]
    questions += [{"prompt": f"What colour is {thing}?", "answer": colour} for thing, colour in COLOURS]
    # The whole sequence with its final period, so "1, 2, 3, 4, 5." does not pass for "1, 2, 3, 4.".
    questions += [{"prompt": f"Count from 1 to {n}.", "answer": ", ".join(str(i) for i in range(1, n + 1)) + "."} for n in range(2, 6)]
    return questions


def main(out_dir: str = "data/sample", eval_dir: str = "data/sample_eval") -> None:
    rng = random.Random(1234)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "chat_en.jsonl", "w", encoding="utf-8") as f:
        for i in range(200):
            record = {"id": i, "source": "synthetic-en", "messages": conversation(rng, english_turn, SYSTEMS)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    records = []
    for i in range(120):
        messages = conversation(rng, chinese_turn, SYSTEMS_ZH)
        if i % 3 == 0:
            messages[-1]["name"] = "assistant-zh"  # a per-message extra field
        records.append({"uid": f"zh-{i:04d}", "tags": ["zh", "synthetic"], "messages": messages})
    with open(out / "chat_zh.json", "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    questions = generation_questions()
    Path(eval_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(eval_dir) / "questions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    print(f"wrote 200 + 120 conversations to {out}/ and {len(questions)} generation questions to {eval_dir}/")


if __name__ == "__main__":
    main(*sys.argv[1:3])
