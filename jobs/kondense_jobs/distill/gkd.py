"""gkd: on-policy generalized knowledge distillation with TRL's `experimental.gkd.GKDTrainer`.

Chosen over the stable `trl.DistillationTrainer` because the API's `lmbda` (the fraction of
batches the student generates on-policy, the rest being the dataset's own continuations) exists
only there: DistillationTrainer is always on-policy. Knobs: lmbda -> lmbda, beta -> beta
(generalized JSD: 0 forward KL, 1 reverse KL), maxNewTokens -> max_new_tokens,
generationTemperature -> temperature (in GKD that is the *sampling* temperature; its divergence
is taken at T = 1, so spec.temperature is not used; 0 switches the student's sampling to
greedy), seq_kd off. The records are given pre-tokenized ({input_ids, completion_mask}: prompt
tokens then the rest of the text), a form TRL's DataCollatorForChatML accepts as is. A chat record
(the messages field) is cut by `data.chat_prompt`: the prompt is the conversation up to its last
user turn through the tokenizer's chat template with its generation prompt, the completion the
assistant turn after it as the template renders it (end-of-turn tokens included), or nothing
when the conversation ends on the user: then only on-policy batches teach from it.
"""

from __future__ import annotations

import warnings

from kondense_jobs import data
from kondense_jobs.distill.setup import Built, Inputs, load_student, load_teacher, training_args
from kondense_jobs.runtime import Context, require


def gkd_records(records: list[dict], ref, tokenizer, seq: int) -> list[dict]:
    """Pre-tokenized {prompt, input_ids, completion_mask}: the prompt, then the rest of the text
    (of a chat record: the templated turns up to the last user turn, then the assistant's reply).

    The rest of the text is what the off-policy batches (a fraction 1 - lmbda) train on. TRL's
    collator reads "prompt" only when completion_mask is absent, but it must be present.
    """
    eos = tokenizer.eos_token_id
    out = []
    for r in records:
        text, prompt = r.get(ref.text_field), r.get(ref.prompt_field)
        chat = data.is_chat(r, ref)
        if chat:  # template text: its special tokens are written out, none added
            prompt, rest = data.chat_prompt(r, ref, tokenizer)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
        elif isinstance(prompt, str) and prompt:
            p_ids = tokenizer(prompt)["input_ids"]
            rest = text[len(prompt) :] if text.startswith(prompt) else text
            c_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
            p_ids, c_ids = ids[: ref.prompt_tokens], ids[ref.prompt_tokens :]
        p_ids = p_ids[-max(1, seq // 2) :]
        if eos is not None and (not chat or not c_ids) and len(p_ids) + len(c_ids) < seq:  # a template ends its own turns
            c_ids = c_ids + [eos]
        c_ids = c_ids[: seq - len(p_ids)]
        mask = [0] * len(p_ids) + [1] * len(c_ids)
        out.append({"prompt": tokenizer.decode(p_ids), "input_ids": p_ids + c_ids, "completion_mask": mask})
    return out


def build(ctx: Context, job: Inputs) -> Built:
    datasets = require("datasets", "gkd distillation")
    with warnings.catch_warnings():  # TRLExperimentalWarning: a deliberate choice, see the module docstring
        warnings.simplefilter("ignore")
        gkd = require("trl.experimental.gkd", "gkd distillation")
    spec = job.spec
    found = gkd_records(job.split.train, ctx.run.dataset, job.tokenizer, job.seq)
    greedy = spec.generation_temperature == 0
    args = training_args(
        gkd.GKDConfig, job,
        max_length=job.seq, lmbda=spec.lmbda, beta=spec.beta, max_new_tokens=spec.max_new_tokens,
        temperature=1.0 if greedy else spec.generation_temperature, seq_kd=False,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = gkd.GKDTrainer(
        model=load_student(job),
        teacher_model=load_teacher(job),
        args=args, train_dataset=datasets.Dataset.from_list(found), processing_class=job.tokenizer,
    )
    if greedy:  # GKDConfig always samples; generationTemperature 0 means greedy on-policy completions
        for key in ("temperature", "top_k", "top_p"):
            trainer.generation_kwargs.pop(key, None)
        trainer.generation_kwargs["do_sample"] = False
        trainer.generation_config.do_sample = False
    return Built(
        trainer, f"GKD (lmbda={spec.lmbda:g}, beta={spec.beta:g}, trl.experimental.gkd.GKDTrainer)", None,
        {"gkdRecords": float(len(found))},
    )
