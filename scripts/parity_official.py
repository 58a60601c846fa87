"""
Our coconut.py against the official implementation (facebookresearch/coconut), on the same weights.

Not part of the test suite: it needs `transformers` and a checkout of the official repository.

    pip install transformers
    git clone https://github.com/facebookresearch/coconut /tmp/coconut-official
    python scripts/parity_official.py --official /tmp/coconut-official

Both wrap one random GPT-2 checkpoint in the Hugging Face layout (the official Coconut around
transformers' GPT2LMHeadModel, ours around model.GPT loaded from the same folder). On batches of
generated ProsQA at several stages it prints both losses and the largest relative gradient
difference, then compares greedy generations question by question; last, it saves models as the
official run.py does and checks that ours loads them with the same logits and answers.
"""

import argparse
import importlib.util
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coconut  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
from model import GPT  # noqa: E402


def load_official(folder):
    spec = importlib.util.spec_from_file_location("official_coconut", os.path.join(folder, "coconut.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Coconut


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of facebookresearch/coconut")
    parser.add_argument("--n-layer", type=int, default=3)
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    config = GPT2Config(n_layer=args.n_layer, n_head=4, n_embd=64, vocab_size=data.N_VOCAB,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # dropout off: same numbers
    GPT2LMHeadModel(config).save_pretrained(folder)
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager")
    gpt = GPT.from_pretrained(folder)
    official = load_official(args.official)(hf, data.LATENT, data.START_LATENT, data.END_LATENT, data.EOS)
    ours = coconut.Coconut(gpt)

    tokens = [data.tokenize_record(r) for r in data.generate_prosqa(6, seed=1)]
    curriculum = coconut.Curriculum()
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored transposed by Hugging Face
    for stages in [(0,) * 6, (1, 2, 3, 1, 2, 3), (6,) * 6, (0, 3, 7, 2, 5, 1)]:
        batch = coconut.collate([coconut.build_example(t, curriculum, s) for t, s in zip(tokens, stages)])
        hf.zero_grad()
        gpt.zero_grad()
        loss_official = official(**batch).loss
        loss_official.backward()
        loss_ours = ours(**batch)
        loss_ours.backward()
        hf_grads = {name: p.grad for name, p in hf.named_parameters()}
        worst = 0.0
        for name, p in gpt.named_parameters():
            if name == "lm_head.weight":  # tied to wte, compared there
                continue
            g = hf_grads[name]
            g = g.t() if name.endswith(conv1d) else g
            worst = max(worst, ((p.grad - g).abs().max() / g.abs().max().clamp(min=1e-12)).item())
        print(f"stages {stages}: loss official {loss_official.item():.6f}, ours {loss_ours.item():.6f}; "
              f"largest relative gradient difference {worst:.1e}")

    hf.eval()
    gpt.eval()
    prompts = [coconut.build_example(t, curriculum, 6, prompt_only=True)["input_ids"] for t in tokens]
    batched = ours.generate(**coconut.collate([{"input_ids": p} for p in prompts], for_generation=True),
                            max_new_tokens=20)
    same = 0
    for p, answer in zip(prompts, batched):
        reference = official.generate(torch.tensor([p]), None, max_new_tokens=20)[0, len(p):].tolist()
        same += reference == answer
    print(f"greedy generations equal on {same} of {len(prompts)} questions")
    check_saved_checkpoints(load_official(args.official), prompts)


def check_saved_checkpoints(official_coconut, prompts):
    """Files saved as run.py saves them (torch.save of a state dict: the Coconut wrapper, or a plain
    GPT2LMHeadModel for CoT) load into ours with the same logits and greedy answers. GPT-2's own
    width, since such files carry no config and the head count must follow from the tensors."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = dict(n_layer=2, n_head=12, n_embd=768, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    folder = tempfile.mkdtemp()
    for method, vocab_size in (("coconut", data.N_VOCAB), ("cot", 50257)):
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **config)).eval()
        model = official_coconut(hf, data.LATENT, data.START_LATENT, data.END_LATENT, data.EOS) if method == "coconut" else hf
        path = os.path.join(folder, f"{method}_checkpoint")
        torch.save(model.state_dict(), path)
        run = evaluate.load_run(path, method=method, dataset="prosqa")
        idx = torch.randint(0, 50257, (2, 24))
        with torch.no_grad():
            worst = (run.model.gpt(idx)[0][..., :vocab_size] - hf(idx).logits).abs().max().item()
        same = 0
        for p in prompts if method == "coconut" else [p[:p.index(data.START_LATENT)] for p in prompts]:
            ours = run.model.generate(**coconut.collate([{"input_ids": p}], for_generation=True), max_new_tokens=10)[0]
            if method == "coconut":
                theirs = model.generate(torch.tensor([p]), None, max_new_tokens=10)[0, len(p):].tolist()
            else:
                theirs = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
            theirs = theirs[:theirs.index(data.EOS)] if data.EOS in theirs else theirs
            same += ours == theirs
        print(f"{method} checkpoint as run.py saves it: largest logit difference {worst:.1e}, greedy answers "
              f"equal on {same} of {len(prompts)} prompts")


if __name__ == "__main__":
    main()
