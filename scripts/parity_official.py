"""
Our coconut.py against the official implementation (facebookresearch/coconut), on the same weights.

Not part of the test suite: it needs `transformers` and a checkout of the official repository.

    pip install transformers
    git clone https://github.com/facebookresearch/coconut /tmp/coconut-official
    python scripts/parity_official.py --official /tmp/coconut-official

Both wrap one random GPT-2 checkpoint in the Hugging Face layout (the official Coconut around
transformers' GPT2LMHeadModel, ours around model.GPT loaded from the same folder). On batches of
generated ProsQA at several stages it prints both losses and the largest relative gradient
difference, then compares greedy generations question by question.
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
        loss_ours, _ = ours(**batch)
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


if __name__ == "__main__":
    main()
