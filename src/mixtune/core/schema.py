"""The one normalized example every source becomes, and the capability each skill keyword stands for.

An example is a plain dict (fast to read and write by the million) with these keys, in this order:
    id          unique, stable: "<source>/<n>"
    source      the source's name in params.yaml
    task        the task it belongs to (a scenario has several specialist tasks)
    keywords    skill keywords (BIG-bench's vocabulary)
    capability  subset of understanding / reasoning / knowledge, derived from the keywords
    prompt      chat messages before the answer: [{"role": "system"|"user"|"assistant", "content": str}]
    completion  the answer the model is tuned to produce
    options     for classification and multiple choice: the label set (completion is one of them); else null
"""

from __future__ import annotations

CAPABILITY_KEYWORDS = {
    "understanding": {
        "reading comprehension", "contextual question-answering", "narrative understanding",
        "paraphrase", "summarization", "text classification", "sentiment analysis", "emotional understanding",
        "figurative language", "implicit reasoning", "context length", "coreference resolution",
        "natural language inference", "topic classification",
    },
    "reasoning": {
        "logical reasoning", "mathematics", "arithmetic", "common sense", "causal reasoning",
        "deductive reasoning", "inductive reasoning", "analogical reasoning", "algorithms",
        "multi-step", "algebra", "mathematical proof", "logic", "spatial reasoning", "social reasoning",
    },
    "knowledge": {
        "context-free question answering", "world knowledge", "domain specific", "memorization",
        "factuality", "truthfulness", "physics", "biology", "chemistry", "medicine", "law", "history",
    },
}

KEYS = ("id", "source", "task", "keywords", "capability", "prompt", "completion", "options")


def capability_of(keywords: list[str]) -> list[str]:
    kw = {k.lower() for k in keywords}
    return [cap for cap, words in CAPABILITY_KEYWORDS.items() if kw & words]


def make_example(
    *, id: str, source: str, task: str, keywords: list[str], capability: list[str] | None,
    prompt: list[dict], completion: str, options: list[str] | None = None,
) -> dict:
    return {
        "id": id,
        "source": source,
        "task": task,
        "keywords": list(keywords),
        "capability": list(capability) if capability else capability_of(keywords),
        "prompt": prompt,
        "completion": completion,
        "options": options,
    }


def prompt_text(example: dict) -> str:
    """The example's input as plain text (for deduplication and decontamination)."""
    return "\n".join(m["content"] for m in example["prompt"])
