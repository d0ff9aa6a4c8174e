"""The synthetic tasks' hooks (named by vsops_synthetic.yaml and vsops_synthetic_marked.yaml):
each row's board is drawn again from its index, with the task of the shipped demo model of that
variant, and a sample's record keeps the visual tokens the model kept (vsops.eval.model)."""
from vsops.demo.model import SHIPPED_MODELS
from vsops.eval.model import split_response
from vsops.eval.synthetic import task_of


def doc_to_visual(doc):
    return [task_of(SHIPPED_MODELS["synthetic"]).image(doc["index"])[0]]


def doc_to_visual_marked(doc):
    return [task_of(SHIPPED_MODELS["synthetic-marked"]).image(doc["index"])[0]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    answer, record = split_response(results)
    return {"accuracy": float(answer.strip().lower() == doc["answer"]), "vsops": record}
