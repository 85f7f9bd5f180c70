"""The player lines the training-data generator speaks and types: templates per emotion, written for this project.

Each emotion has 15 templates; slots ({who}, {thing}, {place}, {creature}, {food}) are filled at random, so a
template yields many lines. Every fifth template (index 0, 5, 10) is held out: lines from it appear only in
the test split, so the held-out numbers are measured on sentences the models never saw.
"""

from __future__ import annotations

import random

HELD_OUT_EVERY = 5

TEMPLATES: dict[str, tuple[str, ...]] = {
    "angry": (
        "You cheated me! Give back {thing} right now!",
        "How dare you touch {thing}, you thief!",
        "I am sick of your lies. Get out of my way!",
        "You burned {place} to the ground and you will pay for it!",
        "Stop wasting my time, you useless fool!",
        "If you lay a hand on {who} again, I will break your arm!",
        "That's the third time you've lied to my face!",
        "I'm furious! You sold {thing} behind my back!",
        "Shut your mouth and listen to me, now!",
        "You call this a fair price? This is robbery!",
        "I've had enough of you and your threats!",
        "Who do you think you are, ordering me around?",
        "You left {who} to die at {place}, you coward!",
        "Give me one good reason not to smash this table!",
        "Damn you! You ruined everything!",
    ),
    "disgust": (
        "Ugh, {food} smells like something died in it.",
        "That is revolting. Get it away from me.",
        "You actually eat that? Disgusting.",
        "The floor of {place} is covered in filth and rats.",
        "I feel sick just looking at {food}.",
        "What is that slime? Gross, it's all over my boots.",
        "You're a vile, slimy little worm.",
        "That rotten smell is making me gag.",
        "Eww, there's a maggot in {food}.",
        "This whole place reeks of sewage and sweat.",
        "I can't believe you'd do something so repulsive.",
        "Yuck. Wash your hands before you touch {thing}.",
        "The way he treats his servants turns my stomach.",
        "That beggar's blanket is crawling with lice, how nasty.",
        "Keep that foul thing away from me.",
    ),
    "fear": (
        "Please, hide me, they're coming for me!",
        "Did you hear that? Something is out there in the dark.",
        "I'm terrified of {creature} near {place}.",
        "Don't hurt me, please, I'll give you anything!",
        "My hands won't stop shaking. I think we're being followed.",
        "What if {creature} comes back tonight?",
        "I'm scared to go past {place} alone.",
        "Help! Please help me, I can't get out!",
        "Something grabbed my leg in the water, I'm so afraid.",
        "I don't want to die down here.",
        "Please, stay close, I'm frightened of the dark.",
        "They said {creature} took {who}. Am I next?",
        "I keep having nightmares about {place}.",
        "Oh no, the door is locked and the fire is spreading!",
        "I'm too scared to sleep with that thing outside.",
    ),
    "happy": (
        "Thank you so much, you've made my day!",
        "This is wonderful news, I'm so happy!",
        "I love {thing}, it's absolutely perfect!",
        "We did it! {place} is safe again!",
        "What a lovely morning, I feel great.",
        "You're a true friend, I'm glad I met you.",
        "Ha! That's the best joke I've heard all week.",
        "{who} is coming home tomorrow, I can't wait!",
        "Thanks a lot, that was really kind of you.",
        "I'm delighted to see you again, my friend.",
        "Everything turned out great, I'm so pleased.",
        "Oh, this is brilliant, thank you!",
        "I finally found {thing}, what a joy!",
        "The festival at {place} was fantastic.",
        "You're wonderful, this is exactly what I wanted.",
    ),
    "sad": (
        "{who} died last winter and I miss them every day.",
        "I lost everything when {place} burned.",
        "I feel so alone since {who} left.",
        "Nothing matters anymore.",
        "I tried my best, but I failed them all.",
        "I can't stop crying about {who}.",
        "My home is gone, and I have nowhere to go.",
        "Nobody came to the funeral.",
        "I used to be happy here, but those days are gone.",
        "I'm tired, and I don't think things will get better.",
        "I sold {thing} to pay the debts, it was all I had left.",
        "I miss the way things were before the war.",
        "{who} doesn't remember my name anymore.",
        "Every night I sit by the window and wait, but no one comes.",
        "I'm sorry, I just feel so empty today.",
    ),
    "surprise": (
        "What? You found {thing}? I don't believe it!",
        "Whoa, I never expected to see you here!",
        "No way! {who} is alive?",
        "Wait, the dragon was real all along?",
        "You're kidding me! That's incredible!",
        "Really? {place} is open again?",
        "Oh! Where did you come from?",
        "I can't believe it, you actually did it!",
        "Huh? The king himself asked for me?",
        "Wow, that's a huge pile of gold!",
        "Wait, what? Since when can you do magic?",
        "Goodness, that came out of nowhere!",
        "Really? {who} is getting married?",
        "Whoa, did that statue just move?",
        "You're telling me {thing} was here the whole time?",
    ),
    "neutral": (
        "Where can I find the blacksmith?",
        "How much for {thing}?",
        "I'd like a room for the night.",
        "Which road leads to {place}?",
        "I walked here from the village this morning.",
        "Tell me about the quest.",
        "What time does the market open?",
        "I need two loaves of bread and some cheese.",
        "Is {who} around today?",
        "The weather looks like rain.",
        "Can you repair {thing}?",
        "I'm looking for work.",
        "The caravan arrives on Thursday.",
        "Do you sell maps of the region?",
        "I'll wait here until the captain returns.",
    ),
}

SLOTS: dict[str, tuple[str, ...]] = {
    "who": (
        "my brother", "my sister", "my old friend", "the captain", "my mother", "my father",
        "my dog", "the old miller", "my wife", "my husband", "my best friend", "the little one",
    ),
    "thing": (
        "my sword", "the map", "my gold", "the amulet", "my shield", "the key", "my boots",
        "the last potion", "my father's ring", "the letter", "my bow", "the lantern",
    ),
    "place": (
        "the mill", "the old bridge", "the chapel", "the north gate", "the harbour",
        "the forest road", "the crypt", "the market", "the mine", "the watchtower",
    ),
    "creature": (
        "a wolf", "the dragon", "a ghoul", "bandits", "the wraith", "a giant spider",
        "something in the dark", "the troll", "the witch",
    ),
    "food": ("this stew", "the ale", "that cheese", "the bread", "this meat", "the fish", "the soup"),
}  # fmt: skip


def templates(emotion: str, split: str) -> list[int]:
    """Indices of the templates of `emotion` that belong to `split` ("train" or "test")."""
    held = [i for i in range(len(TEMPLATES[emotion])) if i % HELD_OUT_EVERY == 0]
    return held if split == "test" else [i for i in range(len(TEMPLATES[emotion])) if i not in held]


def line(emotion: str, split: str, rng: random.Random) -> tuple[str, int]:
    """One line of `emotion` from a template of `split`, slots filled, first letter capitalised; and the
    template's index (samples sharing a template form a group, which train.py keeps on one side of a split)."""
    index = rng.choice(templates(emotion, split))
    text = TEMPLATES[emotion][index].format(**{slot: rng.choice(words) for slot, words in SLOTS.items()})
    return text[0].upper() + text[1:], index
