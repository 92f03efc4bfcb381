import json, torch
torch.set_num_threads(1)
from rlsedit import RLSEdit, RLSEditConfig, load_model
from rlsedit.requests import parse_request
from rlsedit.eval.decoding import greedy_generate
from rlsedit.eval.generation import begins_with
recs = json.load(open('/work/shared/data/counterfact/counterfact-rome-format.json'))[:194]
reqs = [parse_request(r, i) for i, r in enumerate(recs)]
lm = load_model("smollm2")
prompts = [(i, p) for i, r in enumerate(recs) for p in r["paraphrase_prompts"]]
before = greedy_generate(lm, [p for _, p in prompts], 12, stop=(".", "\n"))
edit_before = greedy_generate(lm, [r.prompt.format(r.subject) for r in reqs], 12, stop=(".", "\n"))
ed = RLSEdit(lm, RLSEditConfig())
ed.fit(reqs, batch_size=20)
after = greedy_generate(lm, [p for _, p in prompts], 12, stop=(".", "\n"))
edit_after = greedy_generate(lm, [r.text if hasattr(r,'text') else r.prompt.format(r.subject) for r in reqs], 12, stop=(".", "\n"))
out = []
for (i, p), b, a in zip(prompts, before, after):
    rw = recs[i]["requested_rewrite"]
    out.append(dict(i=i, prompt=p, new=rw["target_new"]["str"], true=rw["target_true"]["str"], subject=rw["subject"],
                    edit_prompt=rw["prompt"].format(rw["subject"]), edit_after=edit_after[i], edit_before=edit_before[i], before=b, after=a,
                    says=begins_with(a, rw["target_new"]["str"]), says_before_true=begins_with(b, rw["target_true"]["str"])))
json.dump(out, open('/tmp/para_fail194.json', 'w'), indent=1)
print(sum(o["says"] for o in out), len(out))
