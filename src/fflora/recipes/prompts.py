"""Prompts in the LLM-Adapters conventions, and their rendering for base or instruct models.

Every canonical record becomes an (instruction, response) pair:
  commonsense: the LLM-Adapters instruction with numbered options; response
               "the correct answer is <label>" (e.g. answer2, solution1, ending4, option2, true)
  math:        the question; response "<reasoning> The answer is N." (training) / the answer
  summary:     "Summarize ..." + the article; response the reference summary
Instruct models (a tokenizer with a chat template) get the instruction as a user turn and the
response as the assistant turn; other models get the Alpaca template LLM-Adapters uses.
"""

from __future__ import annotations

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# dataset -> (instruction head, option word); the option word numbers the candidates (answer1, ...)
_COMMONSENSE = {
    "boolq": ("Please answer the following question with true or false, question: {question}", None),
    "piqa": ("Please choose the correct solution to the question: {question}", "solution"),
    "siqa": ("Please choose the correct answer to the question: {question}", "answer"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: {question}", "ending"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: {question}", "option"),
    "arc_e": ("Please choose the correct answer to the question: {question}", "answer"),
    "arc_c": ("Please choose the correct answer to the question: {question}", "answer"),
    "obqa": ("Please choose the correct answer to the question: {question}", "answer"),
}


def candidate_labels(record: dict) -> list[str]:
    """The answer words a commonsense record's response can name, in choice order."""
    word = _COMMONSENSE[record["dataset"]][1]
    if word is None:
        return list(record["choices"])  # boolq: true / false
    return [f"{word}{i + 1}" for i in range(len(record["choices"]))]


def commonsense_instruction(record: dict) -> str:
    head, word = _COMMONSENSE[record["dataset"]]
    text = head.format(question=record["question"])
    if word is None:
        return text + "\n\nAnswer format: true/false"
    labels = candidate_labels(record)
    options = "".join(f"\n\n{label.capitalize()}: {choice}" for label, choice in zip(labels, record["choices"]))
    return f"{text}{options}\n\nAnswer format: {'/'.join(labels)}"


def choice_text_pairs(record: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice of a commonsense record, scored on the answer's own text.

    lm-eval-harness style, with no instruction and no label words, so that a model's preference
    for one label ("answer2") cannot decide the answer: the choice whose continuation is the most
    likely after its context wins. WinoGrande fills the blank with each option and scores the
    rest of the sentence (the continuation is the same for every option, the contexts differ).
    """
    dataset, question, choices = record["dataset"], record["question"], record["choices"]
    if dataset == "winogrande":
        head, _, tail = question.partition("_")
        return [(head + option, " " + tail.strip()) for option in choices]
    if dataset == "hellaswag":
        return [(question, " " + choice) for choice in choices]
    if dataset == "boolq":
        context = f"{record.get('context', '')}\nQuestion: {question}?\nAnswer:".lstrip()
        return [(context, " yes" if choice == "true" else " no") for choice in choices]
    return [(f"Question: {question}\nAnswer:", " " + choice) for choice in choices]


def commonsense_response(record: dict, label: int | None = None) -> str:
    return f"the correct answer is {candidate_labels(record)[record['label'] if label is None else label]}"


def math_response(record: dict) -> str:
    number = record["answer"]
    shown = int(number) if float(number).is_integer() else number
    solution = record.get("solution", "").strip()
    return f"{solution} The answer is {shown}." if solution else f"The answer is {shown}."


def summary_instruction(record: dict) -> str:
    return f"Summarize the following article in one sentence.\n\n{record['document']}"


def instruction_and_response(record: dict) -> tuple[str, str]:
    """The (instruction, reference response) of any canonical record."""
    if "choices" in record:
        return commonsense_instruction(record), commonsense_response(record)
    if "answer" in record:
        return record["question"], math_response(record)
    if "response" in record:  # a user's prompt/response pair (`fflora.recipes.user_data`)
        return record["prompt"], record["response"]
    return summary_instruction(record), record["summary"]


def render_prompt(tokenizer, instruction: str) -> str:
    """The text the model sees before its response: a chat turn for instruct models, else Alpaca."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
    return ALPACA.format(instruction=instruction)


def response_suffix(tokenizer) -> str:
    """What ends a response in training data: the end-of-turn/eos token, so the model learns to stop."""
    return tokenizer.eos_token or ""
