import pytest
import torch

from uniopd.config import ConfigError, ModelConfig, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import load_model
from uniopd.models.prompts import render_prompt
from uniopd.teachers.local import LocalTeacher
from uniopd.teachers.router import Router
from uniopd.teachers.views import teacher_view


def test_teacher_scores_equal_a_plain_log_softmax(tiny_teacher_dir):
    lm = load_model(ModelConfig(path=str(tiny_teacher_dir)), trainable=False)
    teacher = LocalTeacher("t", TeacherConfig(path=str(tiny_teacher_dir)), lm, chunk_size=3, micro_batch_size=2)
    tok = lm.tokenizer
    recs = [PromptRecord(id=f"r{i}", domain="d", prompt=p, answer="1") for i, p in enumerate(["1+2=", "30+4=", "5="])]
    responses = [tok("3</s>", add_special_tokens=False)["input_ids"], tok("34")["input_ids"][1:], [5]]
    scores = teacher.score(recs, responses)
    expected = []
    with torch.no_grad():
        for r, resp in zip(recs, responses):
            ids = render_prompt(tok, r.prompt) + resp
            logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
            P = len(ids) - len(resp)
            expected += [logp[P - 1 + j, tok_id] for j, tok_id in enumerate(resp)]
    assert torch.allclose(scores.logp_N, torch.stack(expected), atol=1e-5)
    # On CPU in fp32 those scores came from packed copies of the frozen teacher's weights.
    from uniopd.cpu import packed

    linears = [m.weight for m in lm.model.modules() if type(m) is torch.nn.Linear]
    if packed.can_pack(linears[0]):
        cached = {id(ref()) for ref, _, _ in packed._FROZEN.values()}
        assert all(id(w) in cached for w in linears)


def test_privileged_and_teacher_prompt_views():
    rec = PromptRecord(id="a", domain="math", prompt="What is 2+2?", answer="4", teacher_prompt="T: 2+2")
    assert teacher_view(rec, TeacherConfig(view="same")) == "What is 2+2?"
    assert teacher_view(rec, TeacherConfig(view="teacher_prompt")) == "T: 2+2"
    priv = teacher_view(rec, TeacherConfig(view="privileged", privileged_template="{prompt} [answer: {answer}]"))
    assert priv == "What is 2+2? [answer: 4]"


def test_router_by_domain_explicit_teacher_and_errors():
    router = Router({"m": TeacherConfig(domains=["math"]), "c": TeacherConfig(domains=["code"])})
    rec = lambda d, t=None: PromptRecord(id="x", domain=d, prompt="p", answer="1", teacher=t)  # noqa: E731
    assert router.teacher_for(rec("math")) == "m"
    assert router.teacher_for(rec("code")) == "c"
    assert router.teacher_for(rec("math", "c")) == "c"
    with pytest.raises(ConfigError, match="no teacher claims domain 'chem'"):
        router.check([rec("math"), rec("chem")])
    with pytest.raises(ConfigError, match="teacher 'zzz' is not configured"):
        router.teacher_for(rec("math", "zzz"))
    assert Router({"only": TeacherConfig()}).teacher_for(rec("anything")) == "only"
    assert Router({"m": TeacherConfig(domains=["math"]), "any": TeacherConfig(domains=["*"])}).teacher_for(
        rec("bio")) == "any"


def test_image_text_view_writes_each_image_as_text():
    from uniopd.teachers.views import image_text_view

    rec = PromptRecord("v", "vqa", "Which shape?", answer="circle", images=["/a.png"], image_text="a red circle")
    assert teacher_view(rec, TeacherConfig(view="image_text")) == "[image: a red circle]\nWhich shape?"
    msgs = [{"role": "system", "content": "Short answers."},
            {"role": "user", "content": [{"type": "text", "text": "Left: "}, {"type": "image", "image": "/b.png"},
                                         {"type": "text", "text": " and what?"}]}]
    rec = PromptRecord("m", "vqa", msgs, answer="x", images=["/a.png"], image_text=["first", "second"])
    assert image_text_view(rec, "<{text}>") == [
        {"role": "system", "content": "Short answers."},
        {"role": "user", "content": "<first>\nLeft: <second>\n and what?"}]


def test_privileged_view_keeps_the_images_of_a_message_prompt():
    msgs = [{"role": "user", "content": [{"type": "image", "image": "/b.png"}, {"type": "text", "text": "Color?"}]}]
    view = teacher_view(PromptRecord("m", "vqa", msgs, answer="red"),
                        TeacherConfig(view="privileged", privileged_template="{prompt} ({answer})"))
    assert view == [{"role": "user", "content": [{"type": "image", "image": "/b.png"},
                                                 {"type": "text", "text": "Color? (red)"}]}]
