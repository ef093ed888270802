"""The word lists of the agreement measure: function words, negations, yes and no, number
words and groups of mutually exclusive terms. Plain data, so that a wrong decision can be
traced to one list."""

from __future__ import annotations


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS = _words(
    """
    a about above across after again against all almost also although am among an and any are
    around as at be because been before being between both but by could did do does doing done
    down during each either else even ever every for from further had has have having he her here
    hers herself him himself his how however i if in into is it its itself just least let like
    likely may me might more most much must my myself nearly of off often on once only onto or
    other our ours out over own perhaps per quite rather really roughly approximately around
    same she should so some such than that the their theirs them themselves then there these they
    this those though through thus to too under until up upon us very via was we were what when
    where whether which while who whom whose why will with within would yet you your yours
    yourself called call well basically simply answer
    """
)
"""Function words that carry no answer content (plus a few answer fillers: "answer", "called")."""

NEGATIONS = _words("not no never none nobody nothing neither nor cannot without non nowhere")
YES_WORDS = _words("yes yeah yep yup correct indeed absolutely certainly sure affirmative true right")
NO_WORDS = _words("no nope nah incorrect false wrong negative")
AUXILIARIES = _words(
    """is are was were am do does did can could will would should shall has have had may might must
    isn't aren't wasn't weren't don't doesn't didn't can't couldn't won't wouldn't shouldn't"""
)
"""A question that starts with one of these is a yes/no question."""

NUMBER_UNITS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "dozen": 12,
}
NUMBER_SCALES = {
    "hundred": 100,
    "thousand": 1_000,
    "million": 1_000_000,
    "billion": 1_000_000_000,
    "trillion": 1_000_000_000_000,
}
NUMBER_WORDS = frozenset(NUMBER_UNITS) | frozenset(NUMBER_SCALES)

EXCLUSIVE_GROUPS = [
    "higher lower",
    "more less fewer",
    "increase decrease",
    "rise/rose/risen fall/fell/fallen/drop",
    "true false",
    "before after",
    "above below",
    "larger smaller",
    "bigger smaller",
    "greater less",
    "open closed",
    "safe dangerous",
    "hot cold",
    "success failure",
    "pass fail",
    "win/won lose/lost",
    "alive dead",
    "valid invalid",
    "same different",
    "early late",
    "north south",
    "east west",
    "maximum minimum",
    "positive negative",
    "accept reject",
    "allow deny",
    "enable disable",
    "red orange yellow green blue purple violet black white brown pink grey gray",
    "monday tuesday wednesday thursday friday saturday sunday",
    "january february march april may june july august september october november december",
    "spring summer autumn winter",
    "solid liquid gas",
    "odd even",
    "male female",
]
"""Groups of mutually exclusive terms (``/`` joins forms of one term): asserting one where the
other answer asserts another (and neither asserts both) is a contradiction ("prices rose" /
"prices fell")."""

NEGATIVE_PREFIXES = ("non", "un", "in", "im", "il", "ir", "dis")
