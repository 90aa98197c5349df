"""How much a store's model changes prompts that name a supertype ("a polygon", "a warm colour"):
for each supertype of a forgotten concept, the relative change of every attn2 key/value output on
those prompts' token states, ||(W - W0) C||_F / ||W0 C||_F summed over layers (0 for `suplora`'s
frozen subspace, by construction), beside the same for 64 retained prompts; and the share of
images, drawn by the model and by the base from the same noise, on which the judge names the same
class of the supertype's domain.

    python benchmarks/adapters/supertype_change.py STORE > OUT.json
"""

import json
import sys

import numpy as np
import torch

from obliviate.engine import Store
from obliviate.methods.closed_form import kv_layers
from obliviate.models.zoo import load_judge
from obliviate.training.subspace import token_states


def main(store_path: str, images_per_prompt: int = 8) -> dict:
    store = Store(store_path)
    model, base = store.load_model(), store.base_model()
    prompts, forgotten = store.prompts(), store.forgotten()
    onto, judge = prompts.ontology, load_judge("shapes-judge").eval()
    edited, pretrained = model.state_tensors(), base.state_tensors()
    layers = kv_layers(edited)

    def kv_change(texts: list[str]) -> float:
        states = token_states(base, texts).float()
        change = sum(float(((edited[k] - pretrained[k]).float() @ states.T).pow(2).sum()) for k in layers)
        size = sum(float((pretrained[k].float() @ states.T).pow(2).sum()) for k in layers)
        return round((change / size) ** 0.5, 4)

    out = {"retained_kv_change": kv_change(prompts.retain_prompts(forgotten, 64, np.random.default_rng(0)))}
    for supertype in sorted({prompts.supertype_of((c,)) for c in forgotten}):
        names = prompts.supertype_prompts(supertype)
        texts = [t for t in names for _ in range(images_per_prompt)]
        domain = onto.get(onto.supertypes[supertype][0]).domain
        drawn = [judge.predict(m.sample(texts, steps=20, seed=0, solver="dpm"))[domain] for m in (model, base)]
        out[supertype] = {"kv_change": kv_change(names), "images": len(texts),
                          "agreement_with_base": round(float((drawn[0] == drawn[1]).float().mean()), 4)}
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    print(json.dumps(main(sys.argv[1]), indent=1))
