"""Which true paraphrases the edited model (../smollm2-rome-n194-paraphrase-misses, defaults) and the
unedited model with the fact stated before the prompt (newline) begin with the new object."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
edited = {(o["i"], o["prompt"]): o["says"]
          for o in json.load(open(HERE.parent / "smollm2-rome-n194-paraphrase-misses" / "records.json"))}
in_context = [o for o in json.load(open(HERE / "records.json")) if o["kind"] == "paraphrase"]
pairs = [(edited[(o["i"], o["prompt"])], o["stated-newline"]["begins_new"]) for o in in_context]
print(f"{len(pairs)} true paraphrases: both {sum(e and c for e, c in pairs)}, edited only "
      f"{sum(e and not c for e, c in pairs)}, in context only {sum(c and not e for e, c in pairs)}, "
      f"neither {sum(not e and not c for e, c in pairs)}")
