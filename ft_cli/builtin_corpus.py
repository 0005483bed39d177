"""The text the built-in tokenizer is trained on (see builtin_tokenizers.py).

Written for this project, not taken from any data set: everyday English, a little dialogue, numbers, dates,
punctuation, JSON, shell and Python, so the byte-level BPE learns merges for what fine-tuning data looks like.
Changing this text changes the built-in tokenizer, and therefore the cache key of every built-in model.
"""

from __future__ import annotations

_PROSE = """\
The kettle clicked off just as the rain started. Maya poured the water over the tea leaves, waited three \
minutes, and carried the cup to the window. Outside, a man on a bicycle was trying to hold an umbrella with \
one hand and the handlebars with the other. He was not doing very well.

Every morning the bakery on the corner opens at seven. The first customers are usually nurses coming home \
from the night shift and students who have not slept at all. The baker knows most of them by name. She says \
the secret of good bread is patience: a slow rise in a cool room gives the dough time to develop its flavour.

If you want to learn a new language, practise a little every day instead of a lot once a week. Read simple \
stories, listen to the radio, and do not be afraid of making mistakes. Children learn to speak by trying, \
failing, and trying again; adults can do the same.

Our team meeting is on Tuesday at 10:30 in room 4B. Please bring the quarterly report, the updated budget, \
and any questions about the new schedule. If you cannot attend, send your notes to Sam before Monday evening.

The river was low that summer. You could walk across the stones near the old mill without getting your feet \
wet, something nobody in the village could remember doing before. The farmers worried about their crops, and \
the children worried about nothing at all.

A good recipe for a quick dinner: fry one chopped onion in olive oil until soft, add two cloves of garlic, a \
tin of tomatoes and a pinch of salt. Let it simmer for fifteen minutes, then stir in a handful of spinach. \
Serve it with rice, pasta or warm bread. It feeds four people and costs less than ten dollars.

The library will be closed on Friday for repairs to the heating system. Books that are due that day can be \
returned on Saturday without a fine. The children's reading club will meet in the community hall instead.

When the train stopped between two stations, nobody said anything for a while. Then the driver's voice came \
over the speaker: there was a tree on the line, and we would be moving again in about twenty minutes. A woman \
across the aisle opened a bag of oranges and offered them to everyone nearby.

Why is the sky blue? Sunlight contains every colour, but the air scatters short blue waves much more than long \
red ones. When you look at any part of the sky away from the sun, you see that scattered blue light. At sunset \
the light travels through more air, so most of the blue is scattered away and the sky turns orange and red.

Exercise does not have to mean a gym. A brisk thirty-minute walk, taking the stairs, or dancing in the kitchen \
all count. The best kind of exercise is the one you will actually keep doing next week and next year.

Dear Alex, thank you for the lovely birthday card and the book. I started reading it on the bus this morning \
and nearly missed my stop! I hope we can meet for lunch soon. How about next Thursday? Best wishes, Jordan.

The museum's new exhibition shows how people kept time before clocks: sundials, water clocks, candles marked \
with lines, and sand glasses of every size. Visitors can build their own sundial and take it home.

To plant a tree, dig a hole twice as wide as the roots but no deeper. Loosen the soil at the sides, set the \
tree straight, fill the hole, and press the earth down firmly. Water it well, and keep watering it every week \
during its first dry season.

My grandfather kept bees for forty years. He never wore gloves and claimed the bees knew him. In autumn he \
gave jars of honey to every neighbour on the street, and in spring he complained that nobody returned the jars.

The city council voted to add new bus routes and more bicycle lanes. Supporters said it would cut traffic and \
pollution; critics worried about the cost. The first routes will open in March, and the rest by the end of the \
year.

Please remember to switch off the lights, close the windows and lock the back door when you leave. The spare \
key is under the blue flower pot, not the red one.

The history of the bicycle is full of strange machines. Early models had no pedals at all: riders pushed \
themselves along with their feet. Later came the penny-farthing, with a huge front wheel and a tiny back \
one, which was fast but dangerous. The safety bicycle, with two wheels of equal size and a chain, finally \
made cycling popular with ordinary families.

Scientists measure earthquakes with instruments called seismometers. A strong earthquake can be felt \
hundreds of kilometres away, while small ones happen thousands of times a day without anyone noticing. \
Engineers design modern buildings to bend slightly instead of breaking when the ground shakes.

Saving money is easier with a plan. Write down what you earn and what you spend for one month. Most people \
are surprised by how much goes on small things like snacks, taxis and subscriptions they forgot about. \
Decide on a realistic goal, and move that amount into a separate account on payday.

The island has no cars. Visitors arrive by ferry, leave their luggage on a wooden cart, and walk up the hill \
to the guesthouse. In the evening the fishermen mend their nets on the harbour wall while gulls wait \
hopefully.

Photosynthesis is the process plants use to turn light, water and carbon dioxide into sugar and oxygen. It \
happens mainly in the leaves, inside tiny structures called chloroplasts, which contain the green pigment \
chlorophyll. Almost every living thing on Earth depends on it, directly or indirectly.

The hospital is looking for volunteers to read to patients, help at the information desk, and push the tea \
trolley around the wards. No experience is needed; training is provided, and volunteers receive free \
parking.

Our customer service team is available from 8 am to 8 pm, Monday to Saturday. You can reach us by phone, \
email or live chat. For questions about an existing order, please have your order number ready.

Chess is a game of strategy for two players. Each player starts with sixteen pieces: one king, one queen, \
two rooks, two bishops, two knights and eight pawns. The aim is to checkmate the opponent's king, which \
means attacking it so that it has no safe square to escape to.

Computers store everything as numbers. Letters, pictures, sounds and programs are all encoded as long \
sequences of ones and zeros. A byte has eight bits, a kilobyte about a thousand bytes, and a gigabyte about \
a billion. Software turns these numbers back into something people can read, see or hear.

The mountain path was steep and narrow. We stopped often to catch our breath and to look back at the valley, \
where the lake shone like a mirror. Near the top the trees gave way to rocks, wild flowers and a cold wind \
that smelled of snow.

Volcanoes form where hot molten rock, called magma, rises from deep underground. When it reaches the surface \
it is called lava. Some volcanoes erupt gently, with rivers of glowing lava; others explode violently, \
throwing ash high into the atmosphere.

Yesterday's football match ended in a draw. The home side scored early in the first half, but the visitors \
equalised with a header from a corner in the final minutes. The coach praised the defence and said the team \
would work on finishing its chances.

A healthy breakfast does not need to be complicated. Oats with milk and fruit, eggs on toast, or yoghurt \
with nuts and honey will keep most people full until lunch. Drinking a glass of water when you wake up also \
helps.

The printer on the second floor is out of paper again. Spare packs are in the cupboard next to the kitchen. \
If it shows an error message, turn it off, wait ten seconds, and turn it on again before calling the help \
desk.
"""

_DIALOGUE = """\
User: Can you help me write a short email to my landlord about a broken heater?
Assistant: Of course. Here is a draft: "Hello Ms. Lee, the heater in my flat stopped working last night. \
Could someone come to look at it this week? I am at home after 5 pm every day. Thank you, Chris."

User: What is the capital of France?
Assistant: The capital of France is Paris.

User: Summarise the following text in one sentence.
Assistant: The article explains that regular sleep, a balanced diet and daily exercise improve both mood and \
concentration.

User: Translate "good morning" into Spanish and German.
Assistant: In Spanish it is "buenos dias", and in German it is "guten Morgen".

User: I have 3 apples and buy 5 more. Then I eat 2. How many are left?
Assistant: You start with 3, add 5 to get 8, and eat 2, so 6 apples are left.

User: Give me three ideas for a rainy weekend.
Assistant: 1. Bake bread or cookies. 2. Start a jigsaw puzzle. 3. Visit a museum you have never been to.

System: You are a helpful assistant. Answer briefly and politely.
User: Is it safe to leave a phone charging overnight?
Assistant: Generally yes, with a good charger and cable. Modern phones stop charging when the battery is full.

User: Explain what a function is in programming.
Assistant: A function is a named block of code that takes inputs, does some work and returns a result, so you \
can reuse it instead of writing the same steps again.

User: What's the weather like in Berlin today?
Assistant: I will check the forecast for you.
Tool: {"city": "Berlin", "temperature_c": 14, "condition": "cloudy", "wind_kmh": 12}
Assistant: It is 14 degrees and cloudy in Berlin, with a light wind.
"""

_CODE = '''\
def mean(values: list[float]) -> float:
    """Return the arithmetic mean of a non-empty list."""
    if not values:
        raise ValueError("mean() of an empty list")
    return sum(values) / len(values)


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.count = start

    def increment(self, step: int = 1) -> int:
        self.count += step
        return self.count


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import json
with open("data/train.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
print(len(rows), "rows loaded")

$ pip install --upgrade numpy pandas
$ python train.py --epochs 3 --lr 2e-4 --batch-size 16
$ git commit -m "Fix off-by-one error in the data loader"
$ ls -la /home/user/projects && cd src && make test

{"instruction": "Name two primary colours.", "input": "", "output": "Red and blue."}
{"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}]}
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"id": 42, "ok": true, "items": [1, 2, 3], "price": 19.99, "tags": ["new", "sale"], "owner": null}

SELECT name, email FROM users WHERE created_at >= '2024-01-01' ORDER BY name LIMIT 20;
<div class="note"><p>Hello, <b>world</b>!</p></div>
x = (a + b) * c - d / e ** 2; y = [v for v in x if v > 0]; z = {k: v for k, v in pairs}
'''

_WORDS = """\
food: apple banana bread butter cake carrot cheese chicken chocolate coffee cookie corn cream egg fish flour \
fruit garlic grape honey juice lemon lettuce meat milk mushroom noodle nut oil onion orange pasta peach pear \
pepper pie pizza potato rice salad salt sandwich sauce soup sugar tea tomato vegetable water yoghurt
home: apartment bathroom bed bedroom blanket bottle bowl box bucket carpet ceiling chair clock cupboard \
curtain cushion desk door drawer floor fork fridge garage gate glass hall kettle key kitchen knife lamp \
mirror oven pan pillow plate roof room shelf shower sink sofa spoon stairs table towel wall window
body: ankle arm back blood bone brain cheek chest chin ear elbow eye face finger foot hair hand head heart \
hip knee leg lip lung mouth muscle nail neck nose shoulder skin stomach throat thumb toe tongue tooth wrist
nature: air beach branch cloud coast desert dust earth field fire flower forest grass hill ice island lake \
leaf moon mountain mud ocean planet rain river rock root sand sea seed shadow sky snow soil star stone storm \
stream sun thunder tree valley wave weather wind wood
animals: bear bee bird butterfly camel cat chicken cow crab deer dog dolphin donkey duck eagle elephant fox \
frog giraffe goat horse insect kangaroo lion lizard monkey mouse owl parrot penguin pig rabbit rat shark \
sheep snake spider squirrel tiger turtle whale wolf zebra
people: aunt baby boy brother child cousin daughter family father friend girl grandmother guest husband \
king lady man mother neighbour parent partner person prince queen sister son stranger uncle wife woman
jobs: accountant actor architect artist baker builder carpenter cashier chef cleaner dentist designer \
doctor driver editor electrician engineer farmer firefighter gardener journalist judge lawyer librarian \
manager mechanic musician nurse officer painter pharmacist photographer pilot plumber police politician \
programmer researcher sailor scientist secretary singer soldier student surgeon tailor teacher waiter writer
places: airport bank bridge building cafe castle cathedral cinema city country factory farm harbour \
hospital hotel library market museum office park pharmacy playground prison restaurant school shop \
stadium station street supermarket temple theatre tower town university village zoo
travel: bag boat bus camera coat compass flight ferry hat jacket journey luggage map motorbike passport \
platform road scarf shoes suitcase taxi ticket tourist traffic train tram trip tunnel umbrella van visa
time: afternoon age autumn birthday calendar century date dawn day decade evening future holiday hour \
midnight minute moment month morning night noon past present second season spring summer today tomorrow \
tonight week weekend winter year yesterday
work: agreement budget business career client company contract customer deadline email employee goal \
industry interview invoice meeting project proposal report salary schedule strategy task team
science: atom battery cell chemical climate data electricity energy evidence experiment force gas gravity \
heat hypothesis laboratory light liquid magnet mass measurement metal molecule oxygen particle physics \
pressure radiation sample solid sound speed temperature theory volume
computing: algorithm application array browser bug cache click code compiler computer database debug \
download error file folder function hardware input internet keyboard laptop memory network output \
password printer program screen server software storage string upload user variable website
feelings: anger anxiety calm confidence courage curiosity delight fear gratitude grief happiness hope joy \
kindness loneliness love patience pride relief sadness shame surprise trust worry
adjectives: able angry bad beautiful big bitter black blue bored brave bright broken brown busy careful \
cheap clean clear clever cold comfortable common cool correct dangerous dark dead deep different difficult \
dirty dry early easy empty expensive fair famous fast fat favourite few fine flat free fresh friendly full \
funny gentle good great green grey happy hard healthy heavy high honest hot huge hungry important kind large \
late lazy light little lonely long loud low lucky modern narrow natural near nervous new nice noisy normal \
old open orange pink polite poor popular possible pretty proud purple quick quiet rare ready real red rich \
right rough round sad safe short shy silly simple slow small smooth soft sour special strange strong sweet \
tall thick thin tidy tiny warm weak wet white whole wide wild wise wonderful wrong yellow young
adverbs: again almost already also always away certainly clearly completely easily enough especially \
even ever exactly finally fortunately hardly here immediately just later maybe nearly never now often \
only perhaps probably quickly quite rather really recently seldom simply slowly soon still suddenly \
there together too unfortunately usually very well yet
"""

# Regular verbs only, so the -s/-ed/-ing forms generated from them are correct English.
_VERBS = """\
accept add agree allow answer appear arrive ask attack avoid bake believe belong borrow boil brush call \
change check clean climb close collect compare complain cook copy count cover crash cross cry dance decide \
deliver depend describe destroy discover dress enjoy explain fail fill finish fix follow guess hate help \
hope hurry imagine improve include invite join jump kick kill kiss laugh learn like listen live look love \
manage marry measure mention miss move need notice open order paint pass pick play point post pour \
practise prepare print promise protect pull push reach receive record remember repair repeat reply \
report rest return save share shout smile sound start stay taste thank touch train try turn \
use visit wait walk want wash watch wish wonder work worry
"""

_SENTENCE_PARTS = (
    ("The teacher", "My neighbour", "A small dog", "Our manager", "The old car", "Every student", "This computer",
     "The little girl", "A tired driver", "The new phone"),
    ("always", "never", "sometimes", "often", "usually", "rarely", "quickly", "slowly", "happily", "carefully"),
    ("reads", "finds", "opens", "cleans", "watches", "writes", "fixes", "builds", "carries", "remembers"),
    ("the window", "a long letter", "the garden", "an old map", "the kitchen table", "a red ball", "the report",
     "the front door", "a cup of coffee", "the evening news"),
    ("before lunch.", "after school.", "on Sundays.", "in the morning.", "at night.", "during the summer.",
     "when it rains.", "with a smile.", "without a word.", "every day."),
)

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


_IRREGULAR_PLURALS = {"knife": "knives", "shelf": "shelves", "mouse": "mice", "sheep": "sheep", "deer": "deer",
                      "leaf": "leaves", "wife": "wives", "child": "children", "man": "men", "woman": "women",
                      "person": "people", "foot": "feet", "tooth": "teeth", "potato": "potatoes",
                      "tomato": "tomatoes", "fish": "fish", "police": "police", "stairs": "stairs",
                      "shoes": "shoes", "luggage": "luggage", "traffic": "traffic", "salt": "salt"}
_COUNTABLE = ("home", "body", "animals", "people", "jobs", "places", "travel", "work", "computing")


def _word_table() -> dict[str, list[str]]:
    table = {}
    for line in _WORDS.splitlines():
        topic, words = line.split(":")
        table[topic] = words.split()
    return table


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _verb_forms(verb: str) -> tuple[str, str, str]:
    """(third person, past, -ing) of a regular verb."""
    consonant_y = verb.endswith("y") and verb[-2] not in "aeiou"
    if consonant_y:
        third = verb[:-1] + "ies"
    else:
        third = verb + "es" if verb.endswith(("s", "x", "ch", "sh")) else verb + "s"
    past = verb[:-1] + "ied" if consonant_y else verb + "d" if verb.endswith("e") else verb + "ed"
    ing = verb[:-1] + "ing" if verb.endswith("e") and not verb.endswith("ee") else verb + "ing"
    return third, past, ing


def _generated() -> str:
    """Sentences, word forms, dates and sums from fixed tables: repetition that helps common words (and common
    endings such as -ing and -ed) become single tokens."""
    subjects, adverbs, verbs, objects, endings = _SENTENCE_PARTS
    lines = []
    for i in range(300):
        lines.append(f"{subjects[i % 10]} {adverbs[(i * 3) % 10]} {verbs[(i * 7) % 10]} "
                     f"{objects[(i // 10) % 10]} {endings[(i * 9 + i // 10) % 10]}")
    table = _word_table()
    for topic in _COUNTABLE:
        for noun in table[topic]:
            lines.append(f"Here is one {noun}, and there are two {_plural(noun)}.")
    adjectives, nouns = table["adjectives"], table["home"] + table["animals"] + table["places"]
    for i, adjective in enumerate(adjectives):
        lines.append(f"It was a very {adjective} {nouns[(i * 7) % len(nouns)]}.")
    for verb in _VERBS.split():
        third, past, ing = _verb_forms(verb)
        lines.append(f"Today I {verb}, she {third} too; yesterday we {past}, and now they are {ing}.")
    for i in range(60):
        a, b = (i * 37) % 97 + 3, (i * 53) % 89 + 11
        lines.append(f"{a} + {b} = {a + b}, {a} x {b} = {a * b}, and {b} - {a} = {b - a}.")
    for i in range(48):
        lines.append(f"On {_DAYS[i % 7]}, {i % 28 + 1} {_MONTHS[i % 12]} {1990 + i}, the price was "
                     f"${(i * 17) % 200 + 0.5:.2f} ({i * 3 % 100}% off).")
    return "\n".join(lines) + "\n"


def corpus() -> list[str]:
    """The training text, as paragraphs, always in the same order."""
    text = "\n\n".join([_PROSE, _DIALOGUE, _CODE, _WORDS, _generated()])
    return [p for p in text.split("\n\n") if p.strip()]
