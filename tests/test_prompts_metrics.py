import pytest

from fflora.recipes.metrics import extract_choice, extract_number, math_correct, rouge
from fflora.recipes.prompts import (
    ALPACA, candidate_labels, commonsense_instruction, commonsense_response, instruction_and_response, math_response,
    render_prompt,
)

ARC = {"id": "a", "dataset": "arc_e", "question": "Which is a gas?", "choices": ["ice", "steam", "rock"], "label": 1}
BOOLQ = {"id": "b", "dataset": "boolq", "question": "is the sky blue", "choices": ["true", "false"], "label": 0,
         "context": "Sky -- ..."}


def test_commonsense_prompt_follows_llm_adapters():
    assert commonsense_instruction(ARC) == (
        "Please choose the correct answer to the question: Which is a gas?"
        "\n\nAnswer1: ice\n\nAnswer2: steam\n\nAnswer3: rock"
        "\n\nAnswer format: answer1/answer2/answer3"
    )
    assert commonsense_response(ARC) == "the correct answer is answer2"
    assert commonsense_instruction(BOOLQ) == (
        "Please answer the following question with true or false, question: is the sky blue"
        "\n\nAnswer format: true/false"
    )
    assert commonsense_response(BOOLQ) == "the correct answer is true"


@pytest.mark.parametrize("dataset, labels", [
    ("piqa", ["solution1", "solution2"]), ("hellaswag", ["ending1", "ending2"]),
    ("winogrande", ["option1", "option2"]), ("siqa", ["answer1", "answer2"]), ("obqa", ["answer1", "answer2"]),
])
def test_candidate_labels_per_dataset(dataset, labels):
    assert candidate_labels({"dataset": dataset, "choices": ["x", "y"]}) == labels


def test_math_and_summary_pairs():
    gsm = {"dataset": "gsm8k", "question": "2+3?", "answer": 5.0, "solution": "2 + 3 = 5."}
    assert instruction_and_response(gsm) == ("2+3?", "2 + 3 = 5. The answer is 5.")
    assert math_response({"dataset": "svamp", "question": "q", "answer": 2.5}) == "The answer is 2.5."
    xsum = {"dataset": "xsum", "document": "Long text.", "summary": "Short."}
    assert instruction_and_response(xsum) == ("Summarize the following article in one sentence.\n\nLong text.", "Short.")


def test_render_prompt_uses_chat_template_only_for_instruct_models(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert render_prompt(tokenizer, "Do X.") == ALPACA.format(instruction="Do X.")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert render_prompt(tokenizer, "Do X.") == "<user>Do X.<assistant>"


@pytest.mark.parametrize("text, expected", [
    ("the correct answer is answer2", 1),
    ("answer3 because answer1 is wrong", 2),          # first match wins
    ("The correct answer is Answer2", None),         # case-sensitive, as LLM-Adapters
    ("I think answer 2", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(ARC, text) == expected


def test_extract_choice_does_not_confuse_answer1_and_answer10():
    record = {"dataset": "arc_c", "choices": [str(i) for i in range(10)]}
    assert extract_choice(record, "the correct answer is answer10") == 9
    assert extract_choice(BOOLQ, "the correct answer is false, not true") == 1


@pytest.mark.parametrize("text, expected", [
    ("5 + 3 = 8. The answer is 8.", 8.0),
    ("The answer is 1,234.", 1234.0),
    ("it is -3.5 degrees", -3.5),
    ("The answer is 12. Then 7 more steps follow", 12.0),  # a stated answer wins over later numbers
    ("She has 5 apples and buys 7", 7.0),             # no stated answer: the last number (LLM-Adapters)
    ("The answer is $1,250.50.", 1250.5),
    ("The answer is 3/4.", 0.75),
    ("it is \u22124 degrees", -4.0),
    ("answer: .25", 0.25),
    ("no number here", None),
    ("The answer is unclear, but 9", 9.0),           # nothing after the phrase: the last number
    # real GSM8K answer strings (test items 0, 146 and 489, with their calculator annotations)
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the "
     "farmer\u2019s market.\n#### 18", 18.0),
    ("The first set had 500 pieces, and the second set had 3 times as many as the first set, so the second set has "
     "500*3=<<500*3=1500>>1500 pieces\nThe third set had one-quarter of the 500 pieces, so that means it had 500*.25= "
     "<<500*.25=125>>125 pieces\nIn total, that means Johnny picked up 500 + 1500+ 125= <<500+1500+125=2125>>2125 "
     "blocks\n#### 2,125", 2125.0),
    ("-48 + 21 + (-3) = <<-48+21+(-3)=-30>>-30\n-30/3 = <<-30/3=-10>>-10 degrees\nThe average highest temperature "
     "recorded in Southlandia, Northlandia, and Midlandia is -10 degrees Fahrenheit.\n#### -10", -10.0),
    # the same rationales as fflora trains on them (annotations dropped, "The answer is N." appended)
    ("Johnny picked up 500 + 1500+ 125= 2125 blocks The answer is 2125.", 2125.0),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_math_correct_tolerance():
    assert math_correct(8.0005, 8.0) and not math_correct(8.01, 8.0) and not math_correct(None, 8.0)


def test_rouge_known_values():
    assert rouge(["the cat sat"], ["the cat sat"]) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    scores = rouge(["the cat"], ["the cat sat down"])
    assert scores["rouge1"] == pytest.approx(100 * 2 * (1.0 * 0.5) / 1.5)  # P=1, R=0.5
    assert scores["rouge2"] == pytest.approx(100 * 2 * (1.0 * 1 / 3) / (4 / 3))
    assert rouge(["dog"], ["cat"])["rouge1"] == 0.0


def test_best_constant_label_and_label_histogram():
    from fflora.recipes.metrics import best_constant_label, label_histogram

    assert best_constant_label([3, 1, 3, 0, 1, 3]) == {"label": 3, "accuracy": 50.0}
    assert best_constant_label([2, 1]) == {"label": 1, "accuracy": 50.0}  # a tie goes to the lowest label
    assert label_histogram([1, None, 0, 1]) == {"0": 1, "1": 2, "none": 1}
