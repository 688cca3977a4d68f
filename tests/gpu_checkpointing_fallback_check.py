"""GPU check of the trainer's out-of-memory fallback (run by hand on a GPU box; not collected by pytest).

    PYTHONPATH=shared:. python tests/gpu_checkpointing_fallback_check.py [BUDGET_GIB]

A LoRA step of a 7B-wide Llama (8 of its 32 decoder layers, batch 4 × 2,497 tokens as in the trainer's
default) under a memory budget (torch.cuda.set_per_process_memory_fraction, as ``dreamframe up`` gives the
trainer): the first try runs out of memory; after the error the activations must be freed, and the same
step with ``modeling.turn_on_activation_checkpointing`` (what ``TrainingLoop`` does) must fit. Prints JSON.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from dreamframe.models import video_llm
from services.trainer import modeling

GIB = 2**30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(budget_gib: float) -> dict:
    torch.cuda.set_per_process_memory_fraction(
        budget_gib * GIB / torch.cuda.get_device_properties(0).total_memory
    )
    config = video_llm.llava_7b_config().text_config  # the trainer's 7B language model, 8 of 32 layers
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=TARGETS)
    )
    model.train()
    ids = torch.randint(0, config.vocab_size, (4, 2497), device="cuda")
    out = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "budget_gib": budget_gib,
        "weights_gib": torch.cuda.memory_allocated() / GIB,
    }

    def step() -> float:
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()

    torch.cuda.reset_peak_memory_stats()
    try:
        step()
        out["first_try"] = "fit"
    except torch.OutOfMemoryError as exc:
        out["first_try"] = str(exc).split("\n", 1)[0][:200]
    out["first_try_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    out["after_oom_allocated_gib"] = torch.cuda.memory_allocated() / GIB
    modeling.turn_on_activation_checkpointing(model)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    out["retry_loss"] = step()
    torch.cuda.synchronize()
    out["retry_seconds"] = time.perf_counter() - started
    out["retry_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    out["retry_grads_finite"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    out["checkpointed_step_seconds"] = time.perf_counter() - started
    return out


if __name__ == "__main__":
    print(json.dumps(main(float(sys.argv[1]) if len(sys.argv) > 1 else 14.0), indent=1))
