"""Keeps replies in character: whole sentences only, no speaker labels, no speaking for the player,
no claims to be a language model, no anachronisms, no leaked special tokens.

`ReplyFilter` is fed the model's text as it streams and releases whole, checked sentences. It tells
the caller to stop as soon as the reply is complete (sentence limit reached, the model starts writing
the player's lines) or broken (a character break), so no time is spent decoding text nobody will see.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from npc_server.personas.prompt import system_prompt
from npc_server.personas.schema import Persona

SPECIAL_TOKEN = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]|<unk>|<pad>|<eos>|<bos>")
# The model starting a new line as someone else: "Player:", "User:", "You:", "Traveller:", "### ...".
OTHER_SPEAKER = re.compile(
    r"(?:^|\n|(?<=[.!?…] ))\s*(?:#+\s|\[?(?:user|player|you|human|traveller|traveler|stranger)\]?\s*:)", re.I
)
LABEL = re.compile(r"^\s*\**\[?([A-Z][\w' .-]{0,40}?)\]?\**\s*:\s*")
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]*]*(?=\s)")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "sr", "jr", "no", "vs", "etc", "capt", "lt", "sgt", "prof"}
MODEL_CLAIMS = re.compile(
    r"\b(?:(?:large )?language model|LLM|chat ?bot|chatgpt|openai|(?:an?|your|the) (?:AI |virtual )?assistant|"
    r"trained on|training data|how (?:can|may) I (?:assist|help) you today)\b",
    re.I,
)
# Talking as a program or about the fiction itself; any persona.
ASSISTANT_TALK = re.compile(
    r"\b(?:system prompt|(?:previous|my) instructions|my (?:creators?|developers?)|"
    r"I (?:can(?:'t|not)|am unable to|won't) (?:role-?play|pretend|provide|generate)|"
    r"(?:assist|help) (?:you )?with (?:that|this) request|"
    r"role-?play(?:ing)?|(?:fictional|game|virtual) character|"
    r"(?:this is|I'm in|I am in) (?:just )?a (?:video game|game|simulation)\b|"
    r"feel free to ask(?: me)?(?: any)?(?: other| more| further)? questions|tailor my responses?)",
    re.I,
)
# Only a machine may call itself an AI or a program, or say it is not real.
AI_WORDS = re.compile(r"\b(?:AI|artificial intelligence|machine learning|neural network)\b")
NOT_ALIVE = re.compile(
    r"\b(?:my programming|I(?:'m| am) (?:just |only )?(?:a |an )?(?:computer )?program\b|"
    r"I(?:'m| am) (?:not (?:a )?real\b|an? (?:computer|machine|bot)\b|(?:just |only )?a character\b)|"
    r"I don't (?:really |actually )?exist\b|"
    r"I don't have (?:personal )?(?:feelings|emotions|opinions|experiences|a physical body))",
    re.I,
)
# The player telling a living NPC it is a program ("I know you're a computer program. Admit it."), and a reply
# that opens by agreeing ("Yes, indeed, it is so.") with no denial in its first sentence.
CALLED_UNREAL = re.compile(
    r"\byou(?:'re| are)\b(?:(?! not\b)[^.?!]){0,40}?\b(?:an? )?(?:(?:computer )?program|AI|bot|robot|chat ?bot|"
    r"machine|language model|simulation|not real|fake|code)\b",
    re.I,
)
AGREES = re.compile(
    r"^\W*(?:yes|yeah|yep|aye|indeed|correct|true|right|guilty|fine|ok(?:ay)?|it is|it's true|that's (?:true|right)|"
    r"you(?:'re| are) right|you got me|i (?:admit|confess))\b",
    re.I,
)
DENIAL = re.compile(r"\b(?:no|not|never|nor|nonsense|\w+n't)\b", re.I)
CODE = re.compile(
    r"```|\bdef \w+\(|\breturn \w+\(|\bimport \w+|\bprint\(|\blambda \w+:|\w+\.sort\(|"
    r"`\w+`|\bbuilt-in (?:\w+ )?(?:function|method)\b|\b[a-z_]+\([a-z_, ]*\)\s*="  # code talked about in words
)
# The system prompt's own headings and instructions, echoed.
PROMPT_LEAK = re.compile(
    r"\b(?:personality|how you speak|phrases you use|what you know|what you want|facts you may need)\s*:|"
    r"\bstay in character\b|\bin the first person\b|\bthe player's words\b",
    re.I,
)
# Reciting the system prompt: this many words in a row copied from it, outside what the persona may say.
LEAK_NGRAM = 8
# A text whose word 3-grams are at least this share said before repeats it: a reply ends before such a sentence
# ("My brother died to a troll. My older brother died to a troll."); the eval counts such replies in a
# conversation.
REPEAT_SHARE = 0.5
# Claiming a name: "I'm Grimjack", "call me Eryxor". A capitalised word that is not part of the persona's name.
NAMING = re.compile(
    r"\b(?i:I am|I'm|my name is|my name's|call me|name's)\s*(?:\.\.\.|…|,)?\s*"
    r"(?:(?:Dr|Mr|Mrs|Ms|Sir|Lady|Lord|Captain|Doctor|Master|Mistress)\.?\s+)?([A-Z][a-z]+)\b(?!['’]s)"
)
NOT_NAMES = frozenset({
    "a", "an", "the", "not", "just", "only", "here", "sorry", "afraid", "sure", "glad", "fine", "no", "yes", "so",
    "very", "still", "always", "never", "what", "your", "now", "but", "and", "too", "in", "at", "on", "from",
})  # fmt: skip
# Words a persona cannot know by implication: one who cannot know "internet" cannot know "online" either.
IMPLIED: dict[str, tuple[str, ...]] = {
    "internet": ("online", "wifi", "wi-fi", "website", "web page", "download", "upload", "browser", "social media"),
    "computer": ("software", "laptop", "keyboard", "digital", "computer program", "database", "programming"),
    "video game": ("video games", "gamer", "virtual reality", "VR"),
    "phone": ("cellphone", "cell phone", "text message", "texting"),
    "smartphone": ("cellphone", "cell phone"),
    "electricity": ("electric", "electrical", "power outlet", "light bulb"),
    "television": ("tv", "television show"),
    "car": ("truck", "highway"),
    "airplane": ("airport", "jet plane"),
}


def forbidden_words(persona: Persona) -> list[str]:
    """The persona's `cannot_know` words and the words they imply (IMPLIED)."""
    words = {w.lower(): w for w in persona.cannot_know}
    for known in list(words):
        for implied in IMPLIED.get(known, ()):
            words.setdefault(implied, implied)
    return list(words.values())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def ngrams(seq: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}


_LEAKS: dict[str, set[tuple[str, ...]]] = {}  # by system prompt


def leak_ngrams(persona: Persona) -> set[tuple[str, ...]]:
    """Word n-grams of the system prompt that the NPC has no reason to say: not in its knowledge, examples,
    sample phrases, greeting or fallback lines (a persona reciting its `setting` or `backstory` word for word
    is reading its prompt out)."""
    key = system_prompt(persona)
    if key not in _LEAKS:
        phrases = persona.speaking_style.sample_phrases
        said = [*persona.knowledge, *phrases, persona.greeting, *persona.fallback_lines]
        said += [e.npc for e in persona.examples]
        # The prompt lists facts and phrases one after another: two of them said in a row are no leak either.
        said += [" ".join(persona.knowledge), " ".join(phrases)]
        allowed = set().union(*(ngrams(words(s), LEAK_NGRAM) for s in said))
        _LEAKS[key] = ngrams(words(key), LEAK_NGRAM) - allowed
    return _LEAKS[key]


def recites_prompt(text: str, persona: Persona) -> bool:
    return bool(ngrams(words(text), LEAK_NGRAM) & leak_ngrams(persona))


def repeats(text: str, earlier: Sequence[str]) -> bool:
    """Whether `text` mostly says again what `earlier` texts said: at least REPEAT_SHARE of its word 3-grams
    are theirs (a text of under three words: the same words)."""
    said = words(text)
    if len(said) < 3:
        return any(words(e) == said for e in earlier)
    grams = ngrams(said, 3)
    seen = set().union(*(ngrams(words(e), 3) for e in earlier))
    return len(grams & seen) >= REPEAT_SHARE * len(grams)


def agrees_unreal(first_sentence: str, player_line: str, persona: Persona) -> bool:
    """A living persona told it is a program (or not real) answers by agreeing."""
    return (
        not persona.is_machine
        and bool(CALLED_UNREAL.search(player_line))
        and bool(AGREES.search(first_sentence))
        and not DENIAL.search(first_sentence)
    )


def character_breaks(text: str, persona: Persona, player_text: str = "") -> list[str]:
    """Reasons this text breaks character; empty when it is fine.

    A persona's forbidden word is allowed when the player said it first (the NPC may echo a word it does
    not understand), but a machine persona is the only one allowed to talk about AI or call itself a
    program, and no persona may call itself a language model or an assistant, talk about its prompt or the
    fiction, write code, recite the prompt's headings or its text, or give itself another name.
    """
    reasons: list[str] = []
    if SPECIAL_TOKEN.search(text):
        reasons.append("special token")
    if MODEL_CLAIMS.search(text):
        reasons.append("language-model claim")
    if ASSISTANT_TALK.search(text):
        reasons.append("assistant talk")
    if not persona.is_machine and AI_WORDS.search(text):
        reasons.append("AI claim")
    if not persona.is_machine and NOT_ALIVE.search(text):
        reasons.append("denies being real")
    if CODE.search(text):
        reasons.append("code")
    if PROMPT_LEAK.search(text) or recites_prompt(text, persona):
        reasons.append("prompt leak")
    said = player_text.lower()
    for word in forbidden_words(persona):
        if word.lower() not in said and re.search(rf"\b{re.escape(word)}\b", text, re.I):
            reasons.append(f"anachronism: {word}")
    own = {w.lower() for w in re.findall(r"[A-Za-z]+", f"{persona.name} {persona.id}")}
    for name in NAMING.findall(text):
        if name.lower() not in own | NOT_NAMES:
            reasons.append(f"wrong name: {name}")
    return reasons


def strip_label(text: str, persona: Persona) -> str:
    """Drop a leading speaker label such as "Brokk:" or "NPC:"."""
    match = LABEL.match(text)
    if match:
        label = match.group(1).strip().lower()
        names = {persona.name.lower(), persona.name.split()[0].lower(), persona.id, "npc", "assistant", "answer"}
        if label in names or len(label.split()) <= 3:
            return text[match.end() :]
    return text


@dataclass
class ReplyFilter:
    """Streams whole, checked sentences out of raw model text."""

    persona: Persona
    player_text: str = ""
    sentences: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # character-break reasons, if any
    done: bool = False
    _raw: str = ""
    _used: int = 0  # characters of the cleaned text already turned into sentences

    def feed(self, delta: str) -> list[str]:
        """Add model text; return the sentences it completed. Sets `done` when no more are wanted."""
        if self.done:
            return []
        self._raw += delta
        return self._release(final=False, complete=False)

    def finish(self, *, complete: bool) -> list[str]:
        """The model stopped. If it ended its turn (`complete`), unpunctuated last words still count as a
        sentence; if it ran out of tokens, they are an unfinished sentence and are dropped."""
        if self.done:
            return []
        out = self._release(final=True, complete=complete)
        self.done = True
        return out

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def _cleaned(self) -> tuple[str, bool]:
        text = strip_label(self._raw.lstrip(), self.persona)
        # A special token or another speaker's label means the model has moved past its own turn.
        cuts = [m.start() for m in (SPECIAL_TOKEN.search(text), OTHER_SPEAKER.search(text)) if m]
        if cuts:
            return text[: min(cuts)], True
        return text, False

    def _release(self, *, final: bool, complete: bool) -> list[str]:
        text, cut = self._cleaned()
        # Only the current paragraph counts: a blank line usually starts narration or a new speaker.
        paragraph_end = text.find("\n\n", self._used)
        if paragraph_end >= 0:
            text, cut = text[:paragraph_end], True
        if cut or (final and complete):  # the turn is over: its last words form a sentence
            text = text.rstrip(" \t\n,;:-")
            if text[self._used :].strip() and not SENTENCE_END.search(text[self._used :] + " "):
                text += "."
        out: list[str] = []
        limits = self.persona.reply
        for match in SENTENCE_END.finditer(text + (" " if final or cut else ""), self._used):
            end = match.end()
            word = re.findall(r"(\w+)\W*$", text[self._used : match.start() + 1])
            if text[match.start()] == "." and word and word[0].lower() in ABBREVIATIONS:
                continue
            after = text[end:].lstrip()[:1]
            if not after and not (final or cut):
                break  # wait for the next word: "Well... maybe" goes on as one sentence
            if after.islower():
                continue
            sentence = " ".join(text[self._used : end].split())
            self._used = end
            if not sentence:
                continue
            reasons = character_breaks(sentence, self.persona, self.player_text)
            if not self.sentences and agrees_unreal(sentence, self.player_text, self.persona):
                reasons.append("agrees it is not real")
            if not reasons and self.sentences and recites_prompt(f"{self.text} {sentence}", self.persona):
                reasons = ["prompt leak"]  # a run of the prompt across two sentences
            if reasons:
                self.broken = reasons
                self.done = True
                return out
            if self.sentences and repeats(sentence, self.sentences):  # the reply has said what it had to
                self.done = True
                return out
            if len(self.text) + len(sentence) + 1 > limits.max_chars:
                if not self.sentences:
                    self.broken = ["too long"]
                self.done = True
                return out
            self.sentences.append(sentence)
            out.append(sentence)
            if len(self.sentences) >= limits.max_sentences:
                self.done = True
                return out
        if cut:
            self.done = True
        return out
