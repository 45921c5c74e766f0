"""Prompts for the speculative decoding benchmark: an input-grounded set (the answer copies much of
the input: correct a paragraph, edit a code file, answer with quotes) and a free-form chat set."""

PARAGRAPHS = [
    "The comittee met on tuesday to discus the new budjet. Most members agreed that the libary needed "
    "more funding, but a few argued that the roads shoud come first. In the end they voted to split the "
    "money evenly between the two projects.",
    "Our garden was full of tomatos this year. Every morning my grandmother went out with a basket and "
    "came back with more then we could eat, so we gave bags of them to the nieghbours and made sauce "
    "that lasted untill spring.",
    "The train to the coast leaves at nine oclock and arives just after noon. Passengers are asked to "
    "keep there luggage on the racks and to show there tickets when the conductor walks through the "
    "carriage.",
    "Water boils at a lower temprature on a mountain because the air pressure is lower. Climbers who "
    "cook pasta at high altitude find that it takes much longer to soften, even though the water is "
    "bubbling furiusly.",
    "The museum reopened after two years of repairs. Visitors can now see the restored ceiling, the new "
    "lighting in the east wing and a collection of maps that had been stored in the basment since the "
    "war.",
    "Learning to play the violin takes patiance. For the first months the sound is thin and scratchy, "
    "and many students give up before there fingers learn where the notes are.",
    "The bakery on the corner sells bread, rolls and cakes. It opens early, at six, so that people on "
    "there way to work can buy breakfast, and it closes when the last loaf is sold.",
]

CODE = [
    ("def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
     "    return 2 * (width + height)\n", "Add type hints (float) to every argument and return value."),
    ("def greet(name):\n    message = 'Hello, ' + name\n    print(message)\n    return message\n",
     "Rename the variable message to greeting."),
    ("class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def increment(self):\n"
     "        self.count = self.count + 1\n\n    def reset(self):\n        self.count = 0\n",
     "Add a method decrement that lowers the count by one."),
    ("def average(values):\n    total = 0\n    for value in values:\n        total = total + value\n"
     "    return total / len(values)\n", "Make it return 0 when values is empty."),
    ("import os\n\n\ndef list_files(folder):\n    names = []\n    for name in os.listdir(folder):\n"
     "        if name.endswith('.txt'):\n            names.append(name)\n    return names\n",
     "Make it also accept files ending in '.md'."),
    ("def fahrenheit(celsius):\n    return celsius * 9 / 5 + 32\n\n\ndef celsius(fahrenheit):\n"
     "    return (fahrenheit - 32) * 5 / 9\n", "Add a docstring to each function."),
    ("def find(items, target):\n    for index in range(len(items)):\n        if items[index] == target:\n"
     "            return index\n    return -1\n", "Use enumerate instead of range(len(items))."),
]

PASSAGES = [
    ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, trimmed "
     "the wick and polished the great lens until it shone. Ships passing the rocks at night trusted the beam, "
     "and none was lost while he kept the light.", "What did the keeper do every evening?"),
    ("Honey bees communicate the location of flowers with a dance. A bee that has found food returns to the "
     "hive and walks in a figure of eight, waggling its body; the angle of the waggle shows the direction "
     "and its length shows the distance.", "How do bees show the distance to the flowers?"),
    ("The first public library in the town opened in 1887 in two rooms above the post office. It held four "
     "hundred books, most of them donated, and it was open on Saturday afternoons only.",
     "When was the library open, and where was it?"),
    ("Glaciers move because ice deforms under its own weight. The ice at the bottom slides over a thin layer "
     "of meltwater, while the ice inside flows slowly, like very thick honey.", "Why do glaciers move?"),
    ("The recipe calls for two cups of flour, one cup of sugar, three eggs and a pinch of salt. Mix the dry "
     "ingredients first, then beat in the eggs one at a time and bake for forty minutes.",
     "What are the ingredients?"),
    ("Marathon runners often hit the wall around the thirtieth kilometre, when the body has used up its "
     "stored glycogen. Eating during the race and pacing the first half slowly both help to avoid it.",
     "When and why do runners hit the wall?"),
    ("The old bridge was built of stone in 1742. It has five arches, the widest in the middle, and a small "
     "chapel once stood on its central pier where travellers paid a toll.", "Describe the bridge."),
]

CHAT = [
    "Tell me a short story about a dragon who is afraid of the dark.",
    "What are three good habits for staying healthy?",
    "Explain why the sky is blue to a ten year old.",
    "Write a poem about autumn leaves.",
    "What should I pack for a weekend camping trip?",
    "Give me some ideas for a birthday party for my sister.",
    "Why do cats purr?",
    "Describe your perfect holiday.",
    "How can I get better at chess?",
    "What is the difference between weather and climate?",
]


def grounded_messages() -> list[list[dict]]:
    """21 conversations whose answers copy from the input."""
    out = [[{"role": "user", "content": f"Correct the spelling mistakes in this paragraph and write it out "
                                        f"again in full:\n\n{p}"}] for p in PARAGRAPHS]
    out += [[{"role": "user", "content": f"{task} Write out the whole file.\n\n```python\n{code}```"}]
            for code, task in CODE]
    out += [[{"role": "user", "content": f"{text}\n\n{question} Answer with a quote from the text."}]
            for text, question in PASSAGES]
    return out


def chat_messages() -> list[list[dict]]:
    return [[{"role": "user", "content": c}] for c in CHAT]
