"""lm-evaluation-harness adapter (issue 17 item 5): model type ``zoo`` on a tiny random model and a local task; its
log-likelihoods equal the model's own, and the harness's accuracy equals the accuracy computed from them."""
import json

import pytest
import torch

import zoo
from zoo.models.language import save_pretrained

lm_eval = pytest.importorskip("lm_eval")

from zoo.integrations.lm_eval import ZooLM  # noqa: E402  (registers model type "zoo")

WORDS = ["<|endoftext|>"] + [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("lm")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    model = zoo.create_model("mamba2_130m", d_model=32, n_layer=2, vocab_size=len(WORDS),
                             ssm_cfg=dict(layer="Mamba2", headdim=8, d_state=16, chunk_size=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)  # confident, distinct predictions
    save_pretrained(model, folder)
    return folder


def _own_logprob(model, ctx, cont):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0, :, : len(WORDS)].double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


class _Request:
    def __init__(self, *args):
        self.args = args


def test_loglikelihoods_equal_the_models_own(folder):
    lm = ZooLM(folder=str(folder), batch_size=3)
    reqs = [_Request("w1 w2 w3", " w4 w5"), _Request("w9", " w9"), _Request("", "w7 w8"), _Request("w3 w3 w3 w3 w3", " w0")]
    got = lm.loglikelihood(reqs)
    enc = lm.tokenizer.encode
    expected = [_own_logprob(lm.model, enc(c), enc(c + x)[len(enc(c)):]) if c else _own_logprob(lm.model, [0], enc(x))
                for c, x in (r.args for r in reqs)]
    for (lp, _), want in zip(got, expected):
        assert lp == pytest.approx(want, rel=1e-5, abs=1e-5)
    # Rolling: the whole text's log-likelihood from the end-of-text token, in windows of max_length.
    text = " ".join(f"w{i % 13}" for i in range(23))
    whole = _own_logprob(lm.model, [0], enc(text))
    assert lm.loglikelihood_rolling([_Request(text)])[0] == pytest.approx(whole, rel=1e-5)
    short = ZooLM(folder=str(folder), max_length=8)  # several windows, each scored with what fits before it
    assert short.loglikelihood_rolling([_Request(text)])[0] < 0
    out = lm.generate_until([_Request("w1 w2", {"until": ["w5"], "max_gen_toks": 6})])
    assert isinstance(out[0], str) and "w5" not in out[0]


def test_harness_runs_a_local_task(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(12):
        q = " ".join(f"w{int(t)}" for t in torch.randint(1, 60, (4,), generator=g))
        docs.append({"question": q, "choices": [f"w{int(t)}" for t in torch.randint(1, 60, (3,), generator=g)],
                     "answer": i % 3})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "task.yaml").write_text(
        "task: zoo_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model="zoo", model_args=f"folder={folder},batch_size=4", tasks=["zoo_tiny_mc"],
                              task_manager=TaskManager(include_path=str(tmp_path)), log_samples=False)
    acc = results["results"]["zoo_tiny_mc"]["acc,none"]
    lm = ZooLM(folder=str(folder))
    right = 0
    for d in docs:
        scores = [lp for lp, _ in lm.loglikelihood([_Request(d["question"], " " + c) for c in d["choices"]])]
        right += max(range(3), key=scores.__getitem__) == d["answer"]
    assert 0 < right < len(docs)  # a score that depends on the weights
    assert acc == pytest.approx(right / len(docs))


def test_bad_model_args():
    with pytest.raises(ValueError, match="give exactly one of pretrained=ENTRY or folder=PATH"):
        ZooLM()
