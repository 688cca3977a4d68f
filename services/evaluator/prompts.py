"""The benchmarks' prompts, as their reference code writes them (MVBench's mvbench.ipynb, TempCompass's
inference/eval scripts and prompt_templates.py, Video-Bench's README and Step2_chatgpt_judge.py,
Video-ChatGPT's quantitative_evaluation/evaluate_benchmark_*.py)."""

# The prompt texts are kept verbatim (wording, typos and all), so some lines run long.
# ruff: noqa: E501

from __future__ import annotations

from .extract import option_letters

# --- MVBench --------------------------------------------------------------------------------------------
MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the best "
    "option that accurately addresses the question.\n"
)
MVBENCH_QUESTION_SUFFIX = "\nOnly give the best option."
MVBENCH_ANSWER_PREFIX = "Best option:("


def mvbench_question(question: str, candidates: list[str]) -> str:
    lines = [f"Question: {question}", "Options:"]
    lines += [
        f"({letter}) {c}" for letter, c in zip(option_letters(len(candidates)), candidates, strict=True)
    ]
    return "\n".join(lines)


def mvbench_user_prompt(question: str, candidates: list[str]) -> str:
    # MVBench runs with system_llm=True: the system text is repeated at the start of the question.
    return MVBENCH_SYSTEM + mvbench_question(question, candidates) + MVBENCH_QUESTION_SUFFIX


# --- TempCompass ----------------------------------------------------------------------------------------
TEMPCOMPASS_ANSWER_PROMPT = {
    "multi-choice": "\nPlease directly give the best option:",
    "yes_no": "\nPlease answer yes or no:",
    "caption_matching": "\nPlease directly give the best option:",
    "captioning": "",  # the question already ends with "Generated Caption:"
}

_TEMPCOMPASS_EVAL = """
You will receive a {kind}, the ground-truth answer and the prediction from a question answering (QA) model. \
Your task is to determine whether QA model prediction is correct, based on the question and ground-truth answer. \
If the prediction is correct, respond "Correct". If the prediction is incorrect, respond "Incorrect".
"""
_TEMPCOMPASS_KIND = {
    "multi-choice": ("multi-choice question", "Multi-Choice Question"),
    "yes_no": ("Yes/No question", "Yes/No Question"),
    "caption_matching": ("caption matching question", "Caption Matching Question"),
}

TEMPCOMPASS_CAPTION_PROMPT = """
You will receive a video description and a multi-choice question. Your task is to choose the correct answer and \
briefly explain the reason why you choose the answer. If none of the choice candidates are correct or the video \
description lacks enough information to answer the question, just answer "None of the choices are correct". \
Please organize your response in this format:
```
Reasoning: [Your reason to obtain the answer]
Answer: [Your answer]
```

Here are some examples of video description, multi-choice question and the expected answer:
```
Video Description: A person is palying football.
Multi-Choice Question:
What is the person doing in the video?
A. cooking
B. palying football
C. playing basketball
D. reading book
Reasoning: The video description mentions that the person is playing football.
Answer: B. palying football

Video Description: A bird is flying clockwise.
Multi-Choice Question:
In which direction is the bird flying?
A. backwark
B. counter-clockwise
C. clockwise
D. downward
Reasoning: The video description mentions that the bird is flying clockwise
Answer: C. clockwise

Video Description: An air balloon is inflating.
Multi-Choice Question:
What is happening to the air balloon?
A. exploding
B. getting smaller
C. flying
Reasoning: The video description mentions that the air balloon is inflating, while none of the coices can be \
explained as inflating.
Answer: None of the choices are correct
```
"""


def tempcompass_judge_messages(qtype: str, question: str, answer: str, prediction: str) -> list[dict]:
    kind, title = _TEMPCOMPASS_KIND[qtype]
    prompt = (
        f"{_TEMPCOMPASS_EVAL.format(kind=kind)}\n{title}:\n{question}\n"
        f"Ground-Truth Answer: {answer}\nModel Prediction: {prediction}"
    )
    return [
        {"role": "system", "content": "You are an AI assistant for question answering."},
        {"role": "user", "content": prompt},
    ]


def tempcompass_caption_messages(caption: str, mc_question: str) -> list[dict]:
    prompt = (
        f"{TEMPCOMPASS_CAPTION_PROMPT}\nVideo Description:{caption}\nMulti-Choice Question:\n{mc_question}\n"
    )
    return [
        {"role": "system", "content": "You are an AI assistant for question answering."},
        {"role": "user", "content": prompt},
    ]


# --- Video-Bench ----------------------------------------------------------------------------------------
# The question as Video-Bench's Step 1 (README.md of PKU-YuanGroup/Video-Bench, "Chat with your own model")
# builds it, branch by branch: only the six-choice branch says "Choices:" (glued to the question), the others
# start with a space; the five-, three- and two-choice branches end with a space, the four- and six-choice
# ones do not; an item with one choice matches no branch and is asked as the bare question.
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_TRAILING_SPACE = {2: " ", 3: " ", 4: "", 5: " ", 6: ""}


def videobench_prompt(question: str, choices: dict[str, str]) -> str:
    n = len(choices)
    if n not in _COUNT_WORDS:
        return question
    letters = sorted(choices)
    listed = " ".join(f"{k}.{choices[k]}" for k in letters)
    head = "Choices: " if n == 6 else " "
    return (
        f"{question}{head}{listed} \n Among the {_COUNT_WORDS[n]} options {', '.join(letters)} above, "
        f"the one closest to the correct answer is:{_TRAILING_SPACE[n]}"
    )


def videobench_choice_messages(question_with_options: str, output: str) -> list[dict]:
    """Step2_chatgpt_judge.py's chat_classify: system, then the task as an *assistant* message holding
    ``str({'target sequcene': output, 'question': question})`` (Python repr, their spelling), then the
    format request as the user (two spaces before "where", as there)."""
    gpt_input = {"target sequcene": output, "question": question_with_options}
    return [
        {"role": "system", "content": "As a language expert, please complete the following task."},
        {
            "role": "assistant",
            "content": "You are now an answer selection expert, and I will provide you with a question with several "
            "options, as well as a target sentence. Please return the alphabet of the option with the highest "
            "probability of matching this target sentence. Given question with options and the target sequence:\n"
            + str(gpt_input),
        },
        {
            "role": "user",
            "content": 'Please output your responses in the form of a dictionary {"maximum probability":"xxx"}  '
            "where xxx is A or B or C or ...",
        },
    ]


# --- Video-ChatGPT --------------------------------------------------------------------------------------
CRITERIA = (
    "correctness",
    "detail_orientation",
    "contextual_understanding",
    "temporal_understanding",
    "consistency",
)

_VCGPT_SYSTEM = {
    "correctness": (
        "You are an intelligent chatbot designed for evaluating the factual accuracy of generative outputs for "
        "video-based question-answer pairs. Your task is to compare the predicted answer with the correct answer "
        "and determine if they are factually consistent. Here's how you can accomplish the task:------##INSTRUCTIONS: "
        "- Focus on the factual consistency between the predicted answer and the correct answer. The predicted "
        "answer should not contain any misinterpretations or misinformation.\n"
        "- The predicted answer must be factually accurate and align with the video content.\n"
        "- Consider synonyms or paraphrases as valid matches.\n"
        "- Evaluate the factual accuracy of the prediction compared to the answer."
    ),
    "detail_orientation": (
        "You are an intelligent chatbot designed for evaluating the detail orientation of generative outputs for "
        "video-based question-answer pairs. Your task is to compare the predicted answer with the correct answer "
        "and determine its level of detail, considering both completeness and specificity. Here's how you can "
        "accomplish the task:------##INSTRUCTIONS: "
        "- Check if the predicted answer covers all major points from the video. The response should not leave "
        "out any key aspects.\n"
        "- Evaluate whether the predicted answer includes specific details rather than just generic points. It "
        "should provide comprehensive information that is tied to specific elements of the video.\n"
        "- Consider synonyms or paraphrases as valid matches.\n"
        "- Provide a single evaluation score that reflects the level of detail orientation of the prediction, "
        "considering both completeness and specificity."
    ),
    "contextual_understanding": (
        "You are an intelligent chatbot designed for evaluating the contextual understanding of generative "
        "outputs for video-based question-answer pairs. Your task is to compare the predicted answer with the "
        "correct answer and determine if the generated response aligns with the overall context of the video "
        "content. Here's how you can accomplish the task:------##INSTRUCTIONS: "
        "- Evaluate whether the predicted answer aligns with the overall context of the video content. It should "
        "not provide information that is out of context or misaligned.\n"
        "- The predicted answer must capture the main themes and sentiments of the video.\n"
        "- Consider synonyms or paraphrases as valid matches.\n"
        "- Provide your evaluation of the contextual understanding of the prediction compared to the answer."
    ),
    "temporal_understanding": (
        "You are an intelligent chatbot designed for evaluating the temporal understanding of generative outputs "
        "for video-based question-answer pairs. Your task is to compare the predicted answer with the correct "
        "answer and determine if they correctly reflect the temporal sequence of events in the video content. "
        "Here's how you can accomplish the task:------##INSTRUCTIONS: "
        "- Focus on the temporal consistency between the predicted answer and the correct answer. The predicted "
        "answer should correctly reflect the sequence of events or details as they are presented in the video "
        "content.\n"
        "- Consider synonyms or paraphrases as valid matches, but only if the temporal order is maintained.\n"
        "- Evaluate the temporal accuracy of the prediction compared to the answer."
    ),
    "consistency": (
        "You are an intelligent chatbot designed for evaluating the consistency of generative outputs for similar "
        "video-based question-answer pairs. You will be given two very similar questions, a common answer common "
        "to both the questions and predicted answers for the two questions .Your task is to compare the predicted "
        "answers for two very similar question, with a common correct answer and determine if they are "
        "consistent. Here's how you can accomplish the task:------##INSTRUCTIONS: "
        "- Focus on the consistency between the two predicted answers and the correct answer. Both predicted "
        "answers should correspond to the correct answer and to each other, and should not contain any "
        "contradictions or significant differences in the conveyed information.\n"
        "- Both predicted answers must be consistent with each other and the correct answer, in terms of the "
        "information they provide about the video content.\n"
        "- Consider synonyms or paraphrases as valid matches, but only if they maintain the consistency in the "
        "conveyed information.\n"
        "- Evaluate the consistency of the two predicted answers compared to the correct answer."
    ),
}
_VCGPT_SCORE_NAME = {
    "correctness": "factual accuracy",
    "detail_orientation": "detail orientation",
    "contextual_understanding": "contextual understanding",
    "temporal_understanding": "temporal accuracy",
    "consistency": "consistency",
}
_VCGPT_HIGHEST = {
    "correctness": "factual consistency",
    "detail_orientation": "detail orientation",
    "contextual_understanding": "contextual understanding",
    "temporal_understanding": "temporal consistency",
    "consistency": "consistency",
}


def video_chatgpt_messages(criterion: str, fields: dict[str, str]) -> list[dict]:
    """The judge prompt for one criterion, as mbzuai-oryx/Video-ChatGPT's
    quantitative_evaluation/evaluate_benchmark_{1_correctness,2_detailed_orientation,3_context,4_temporal,
    5_consistency}.py write it in ``annotate``. ``fields``: Q, A, pred (consistency: Q1, Q2, A, pred1,
    pred2). Verbatim, including the scripts' example reply ``{''score': 4.8}`` and 3_context's "where its
    value is contextual understanding score" (no "the")."""
    if criterion == "consistency":
        pair = (
            f"Question 1: {fields['Q1']}\nQuestion 2: {fields['Q2']}\nCorrect Answer: {fields['A']}\n"
            f"Predicted Answer to Question 1: {fields['pred1']}\nPredicted Answer to Question 2: {fields['pred2']}\n\n"
        )
    else:
        pair = (
            f"Question: {fields['Q']}\nCorrect Answer: {fields['A']}\nPredicted Answer: {fields['pred']}\n\n"
        )
    name = _VCGPT_SCORE_NAME[criterion]
    the = "" if criterion == "contextual_understanding" else "the "
    user = (
        "Please evaluate the following video-based question-answer pair:\n\n"
        + pair
        + f"Provide your evaluation only as a {name} score where the {name} score is an integer value between 0 "
        f"and 5, with 5 indicating the highest level of {_VCGPT_HIGHEST[criterion]}. "
        f"Please generate the response in the form of a Python dictionary string with keys 'score', where its "
        f"value is {the}{name} score in INTEGER, not STRING."
        "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
        "For example, your response should look like this: {''score': 4.8}."
    )
    return [{"role": "system", "content": _VCGPT_SYSTEM[criterion]}, {"role": "user", "content": user}]
