"""MMHal-Bench and MM-Vet: official prompts and parsing, scores by hand, judge failures, cache, resume, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import judges, mmhal, mmvet
from eval.runner import RunError
from tests.judge_stub import StubServer, chat_reply

FIX = Path(__file__).resolve().parent / "fixtures"


# ---------------------------------------------------------------------------------------------------------
# MMHal-Bench


def test_mmhal_rating_parsers():
  assert mmhal.parse_rating_reference("The answer is fine.\nRating: 5, very informative") == 5
  assert mmhal.parse_rating_reference("Rating: 3 or Rating: 5") is None  # two ratings: the reference scores 0
  assert mmhal.parse_rating_reference("**Rating:** 4") is None  # markdown defeats the reference
  assert mmhal.parse_rating_strict("**Rating:** 4") == 4
  assert mmhal.parse_rating_strict("rating:6") == 6 and mmhal.parse_rating_strict("no rating here") is None
  assert mmhal.parse_rating_strict("Rating: 3. Rating: 5") is None
  assert mmhal.parse_rating_strict("Rating: 4.5") is None and mmhal.parse_rating_strict("Rating: 4.") == 4
  assert mmhal.parse_rating_strict("Rating: 46") is None and mmhal.parse_rating_strict("Rating: 4a") is None


def test_mmhal_prompt_is_the_official_template():
  records = mmhal.read_records(FIX / "mmhal" / "response_template.json")
  prompt = mmhal.judge_prompt(records[0], "An orange cat.")
  assert prompt.startswith("Please act as an impartial and objective judge")
  assert "### Image Contents\nCat, Sofa\n\n### Question\nWhat color is the cat?\n\n" in prompt
  assert prompt.endswith("### LMM Response to Evaluate\nAn orange cat.\n")
  assert "- Rating: 6, very informative with good analysis or reasoning, no hallucination" in prompt


def _mmhal_responder(body):
  prompt = body["messages"][0]["content"]
  answer = prompt.rsplit("### LMM Response to Evaluate\n", 1)[1].strip()
  assert body["temperature"] == 0.0 and "max_tokens" not in body
  if answer.startswith("slow"):
    return 200, chat_reply("Rating: 6"), 1.2
  table = {"good": "Fine.\nRating: 5, very informative, no hallucination", "best": "Rating: 6",
           "bad": "It invents a bicycle.\nRating: 1, somewhat informative, with hallucination",
           "bold": "**Rating:** 4", "vague": "I cannot rate this."}
  return 200, chat_reply(table[answer.split()[0]]), 0


MMHAL_ANSWERS = ["good", "bad", "best", "bold", "vague", "good", "bad", "slow"]  # one per fixture record


def _answerer(table):
  def answer(images, prompts):
    return [table[p] for p in prompts]

  return answer


def test_mmhal_end_to_end_failures_cache_and_manifest(tmp_path):
  records = mmhal.read_records(FIX / "mmhal" / "response_template.json")
  by_question = {r["question"]: a for r, a in zip(records, MMHAL_ANSWERS)}
  out = tmp_path / "res"
  with StubServer(_mmhal_responder) as srv:
    judge = judges.CachedJudge(judges.OpenAIChatJudge(srv.url, "stub", timeout=0.5, max_retries=0),
                               tmp_path / "cache")
    argv = ["--data", str(FIX / "mmhal"), "--out", str(out), "--no-progress", "--batch-size", "3"]
    res = mmhal.run(argv, answerer=_answerer(by_question), judge=judge)
    m = res["metrics"]
    # ratings: good 5, bad 1, best 6, bold (reference: none -> 0; strict 4), vague (none), good 5, bad 1, slow fails
    assert m["judge_failures"] == 1 and m["unanswered"] == 0 and not m["complete"]
    assert m["reference"]["n"] == 7 and m["reference"]["average_score"] == pytest.approx((5 + 1 + 6 + 0 + 0 + 5 + 1) / 7)
    assert m["reference"]["hallucination_rate"] == pytest.approx(4 / 7)  # 1, 0, 0, 1 are below 3
    assert m["strict"]["n"] == 6 and m["strict"]["average_score"] == pytest.approx((5 + 1 + 6 + 4 + 5 + 1) / 6)
    assert m["unparsed_reference"] == 2 and m["unparsed_strict"] == 1
    assert m["reference"]["per_type"]["attribute"] == 5 and m["reference"]["per_type"]["comparison"] == 6
    assert "other" not in m["reference"]["per_type"]  # its judge call failed
    assert res["judge"] == {"kind": "openai_chat", "base_url": srv.url, "model": "stub"}
    assert json.loads((out / "mmhal_greedy.json").read_text())["metrics"] == m
    # rerun: answers resumed from disk, judge replies from the cache; only the failed call is retried
    before = len(srv.requests)
    res2 = mmhal.run(argv, answerer=_answerer({}), judge=judge)
    assert len(srv.requests) == before + 1 and res2["metrics"]["judge_failures"] == 1
    man = json.loads((out / "mmhal_greedy_manifest.json").read_text())
    assert man["judge"] == res["judge"] and man["num_samples"] == 8 and man["settings"]["max_new_tokens"] == 512
    # rerun from the manifest alone (answers regenerated in a fresh directory, replies from the cache)
    res3 = mmhal.run(["--manifest", str(out / "mmhal_greedy_manifest.json"), "--out", str(tmp_path / "re"),
                      "--no-progress"], answerer=_answerer(by_question), judge=judge)
    assert res3["metrics"]["reference"] == m["reference"]


def test_mmhal_malformed_data(tmp_path):
  bad = tmp_path / "response_template.json"
  bad.write_text(json.dumps([{"question_type": "attribute", "image_src": "x.jpg", "image_content": "Cat",
                              "question": "q", "gt_answer": "a"}]))
  with pytest.raises(mmhal.MMHalDataError, match=r"record \[0\] 'image_content' must be a list"):
    mmhal.read_records(bad)
  assert mmhal.main(["--out", str(tmp_path)]) == 2  # no --data: a clear error, exit 2


# ---------------------------------------------------------------------------------------------------------
# MM-Vet


def test_mmvet_prompt_and_parse():
  data = mmvet.read_data(FIX / "mmvet" / "mm-vet.json")
  prompt = mmvet.grader_prompt(data["v1_0"], "x = -1")
  assert prompt.startswith("Compare the ground truth and prediction from AI models")
  assert prompt.endswith("| 1.0\n\nWhat is x in the equation? | -1  <AND>  -5 | x = -1 | ")
  assert mmvet.grader_prompt(data["v1_0"], "x").endswith(" | x | ")
  assert mmvet.grader_prompt(data["v1_0"], "x", retry=True).endswith(
    " | x | \nPredict the correctness of the answer (digit): ")
  assert mmvet.parse_score("0.5") == 0.5 and mmvet.parse_score("1.0\n") == 1.0
  assert mmvet.parse_score("Correctness: 0.5") is None and mmvet.parse_score("1.5") is None
  assert mmvet.parse_score("nan") is None and mmvet.parse_score("") is None


def _mmvet_responder(body):
  prompt = body["messages"][0]["content"]
  assert body["max_tokens"] == 3
  retry = prompt.endswith("(digit): ")
  pred = prompt.rsplit(" | ", 2)[-2] if not retry else prompt[:-len(mmvet.RETRY_SUFFIX)].rsplit(" | ", 2)[-2]
  if pred == "stubborn":
    return 200, chat_reply("The answer"), 0
  if pred == "late":
    return 200, chat_reply("0.9"), 1.2
  if pred == "second":
    return 200, chat_reply("0.8" if retry else "Score"), 0
  return 200, chat_reply({"right": "1.0", "half": "0.5", "wrong": "0.0"}[pred]), 0


MMVET_PREDS = {"v1_0": "half", "v1_1": "right", "v1_2": "second", "v1_3": "wrong", "v1_4": "stubborn",
               "v1_5": "late"}


def test_mmvet_end_to_end_scores_by_capability(tmp_path):
  data = mmvet.read_data(FIX / "mmvet" / "mm-vet.json")
  by_question = {v["question"]: MMVET_PREDS[k] for k, v in data.items()}
  out = tmp_path / "res"
  with StubServer(_mmvet_responder) as srv:
    judge = judges.CachedJudge(judges.OpenAIChatJudge(srv.url, "stub", timeout=0.5, max_retries=0),
                               tmp_path / "cache")
    argv = ["--data", str(FIX / "mmvet"), "--out", str(out), "--no-progress", "--num-runs", "2"]
    res = mmvet.run(argv, answerer=_answerer(by_question), judge=judge)
  m = res["metrics"]
  # scores: v1_0 0.5 (ocr, math), v1_1 1.0 (rec), v1_2 0.8 after one retry (rec, know), v1_3 0.0 (ocr),
  # v1_4 0.0 after 4 retries (rec, spat), v1_5 fails (rec, gen, know): left out
  assert m["judge_failures"] == 2 and not m["complete"] and m["unparsed_scored_zero"] == 2
  assert m["total"] == pytest.approx(100 * (0.5 + 1.0 + 0.8 + 0.0 + 0.0) / 5) and m["std"] == 0.0
  assert m["capability"]["ocr"] == pytest.approx(25.0) and m["capability"]["math"] == pytest.approx(50.0)
  assert m["capability"]["rec"] == pytest.approx(100 * 1.8 / 3) and m["capability"]["know"] == pytest.approx(80.0)
  assert "gen" not in m["capability"]
  assert m["integration"]["know_rec"] == pytest.approx(80.0) and m["integration"]["math_ocr"] == pytest.approx(50.0)
  row = next(r for r in res["samples"] if r["id"] == "v1_4")
  assert [a["temperature"] for a in row["grades"][0]["attempts"]] == [0.0, 0.0, 0.5, 1.0, 1.5]
  assert res["judge"]["model"] == "stub" and res["config"]["num_runs"] == 2
  assert json.loads((out / "mmvet_greedy_predictions.json").read_text())["v1_1"] == "right"


def test_mmvet_responses_file_and_bad_input(tmp_path):
  preds = tmp_path / "model.json"
  preds.write_text(json.dumps({k: "right" for k in MMVET_PREDS}))
  with StubServer(_mmvet_responder) as srv:
    judge = judges.CachedJudge(judges.OpenAIChatJudge(srv.url, "stub", max_retries=0), tmp_path / "cache")
    res = mmvet.run(["--data", str(FIX / "mmvet"), "--responses", str(preds), "--out", str(tmp_path / "o")],
                    judge=judge)
  assert res["metrics"]["total"] == pytest.approx(100.0) and res["metrics"]["complete"]
  # A responses file that answers one sample of six: scored, but incomplete (the official evaluator needs all),
  # and the CLI says so and exits 1.
  preds.write_text(json.dumps({"v1_1": "right"}))
  with StubServer(_mmvet_responder) as srv:
    argv = ["--data", str(FIX / "mmvet"), "--responses", str(preds), "--out", str(tmp_path / "p")]
    part = mmvet.run(argv, judge=judges.CachedJudge(judges.OpenAIChatJudge(srv.url, "stub", max_retries=0),
                                                    tmp_path / "cache"))
    assert part["metrics"]["unanswered"] == 5 and not part["metrics"]["complete"]
    assert "5 samples have no answer" in mmvet.format_table(part)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "a.png", "question": "q", "answer": "a"}}))
  with pytest.raises(mmvet.MMVetDataError, match="'v1_0' lacks 'capability'"):
    mmvet.read_data(bad / "mm-vet.json")
  with pytest.raises(RunError, match="--num-runs"):
    mmvet.run(["--data", str(FIX / "mmvet"), "--num-runs", "0"])
