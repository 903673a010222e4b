"""Fixed vocabularies of the simulated app: the food catalog, content library, first names
and cities. They do not depend on the seed, so food and content ids mean the same thing in
every simulated data set (a pretrained food encoder stays valid across demo runs)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from features.contract import FOOD_ID

# Meal slots in the order of `features.contract.MEALS`: breakfast, lunch, dinner, snack.
SLOT_CODES = "BLDS"


def _items(text: str) -> tuple[str, ...]:
    """A comma-separated list written over several lines -> its stripped items."""
    return tuple(" ".join(x.split()) for x in text.split(",") if x.strip())


# Per category: default slots, whether it is "junk" (chosen more as motivation drops), and
# its foods. A food may override slots with ":<codes>"; a trailing "!" marks a junk item in
# an otherwise healthy category (soda in drinks).
_FOODS: dict[str, tuple[str, bool, str]] = {
    "fruit": (
        "BS",
        False,
        """
        apple, banana, orange, strawberries, blueberries, raspberries, grapes, pear, peach,
        mango, pineapple, kiwi, watermelon, cantaloupe, cherries, plums, apricots,
        clementine, grapefruit:B, pomegranate, papaya, blackberries, dried apricots,
        raisins, dates, fig, nectarine, lychee, passion fruit, fruit salad
    """,
    ),
    "vegetable": (
        "LD",
        False,
        """
        broccoli, spinach, kale, carrots, cucumber, tomato, bell pepper, zucchini,
        cauliflower, green beans, asparagus, brussels sprouts, mushrooms, onion, sweet
        potato, potato, corn, peas, lettuce, cabbage, eggplant, celery, beetroot,
        avocado:BLD, side salad, roasted vegetables, steamed veggies, cherry tomatoes:LDS,
        baby carrots:S, hummus with veggies:S
    """,
    ),
    "grain": (
        "LD",
        False,
        """
        oatmeal:B, granola:B, muesli:B, whole wheat toast:B, white toast:B, bagel:B, brown
        rice, white rice, quinoa, whole wheat pasta, pasta, couscous, bulgur, sourdough
        bread:BLD, rye bread:BL, tortilla, pita, rice cakes:S, crackers:S, corn flakes:B,
        bran flakes:B, english muffin:B, pancakes:B, waffles:B, noodles, barley, wild rice,
        multigrain bread:BL, whole grain wrap:L, polenta
    """,
    ),
    "protein": (
        "LD",
        False,
        """
        chicken breast, grilled chicken, salmon, tuna, cod, shrimp, eggs:B, scrambled
        eggs:B, boiled egg:BS, omelette:B, turkey slices:BL, lean beef, steak:D, pork
        chop:D, tofu, tempeh, lentils, chickpeas, black beans, kidney beans, edamame:S,
        turkey burger, ground turkey, sardines, mackerel, protein shake:BS, egg whites:B,
        bacon:B!, sausage:B!, ham:BL
    """,
    ),
    "dairy": (
        "BS",
        False,
        """
        greek yogurt, plain yogurt, low-fat yogurt, skim milk, whole milk, oat milk, almond
        milk, cottage cheese, cheddar cheese:LDS, mozzarella:LD, feta:LD, parmesan:LD,
        string cheese:S, cream cheese:B, kefir, skyr, ricotta:LD, goat cheese:LD, butter:B!,
        swiss cheese:LS, babybel:S, soy milk, yogurt drink, brie:S!, halloumi:LD, quark,
        buttermilk, paneer:LD, fromage frais, vanilla yogurt!
    """,
    ),
    "snack": (
        "S",
        True,
        """
        potato chips, tortilla chips, pretzels, popcorn, salted nuts, almonds, cashews,
        walnuts, peanut butter:BS, trail mix, granola bar, protein bar, cheese crackers,
        beef jerky, rice crackers, nachos, crisps, pita chips, veggie straws, mixed nuts,
        pistachios, peanuts, corn chips, cheese puffs, energy bar, sunflower seeds, pumpkin
        seeds, seaweed snack, salsa and chips, crackers with dip
    """,
    ),
    "sweet": (
        "S",
        True,
        """
        chocolate bar, milk chocolate, dark chocolate, cookies, brownie, donut:BS, blueberry
        muffin:BS, croissant:B, cinnamon roll:B, chocolate cake, cheesecake, ice cream:DS,
        frozen yogurt, gummy bears, candy, jelly beans, apple pie:DS, cupcake, chocolate
        chip cookie, danish pastry:B, lollipop, marshmallows, tiramisu:DS, chocolate
        pudding, waffle with syrup:B, nutella toast:B, banana bread:BS, honey:B, strawberry
        jam:B, caramel popcorn
    """,
    ),
    "drink": (
        "BS",
        False,
        """
        coffee, black coffee, latte, cappuccino, green tea, black tea, herbal tea, orange
        juice:B, apple juice, smoothie, green smoothie, cola:LDS!, diet cola:LDS,
        lemonade:LS!, sparkling water:LDS, coconut water, sports drink!, energy drink!, iced
        tea!, hot chocolate!, beer:D!, red wine:D!, white wine:D!, kombucha, iced coffee,
        protein smoothie, vegetable juice, milkshake!, chai latte, water with lemon:LDS
    """,
    ),
    "fast food": (
        "LD",
        True,
        """
        cheeseburger, hamburger, french fries, pizza slice, pepperoni pizza, hot dog,
        chicken nuggets, fried chicken, burrito, tacos, kebab, fish and chips, onion rings,
        fried rice, chow mein, pad thai takeout, gyro, sub sandwich, breakfast sandwich:B,
        hash browns:B, quesadilla, nachos supreme, chicken wings, mozzarella sticks:S,
        double burger, loaded fries, spring rolls, shawarma, corn dog, pizza pocket:S
    """,
    ),
    "prepared meal": (
        "LD",
        False,
        """
        chicken salad, caesar salad, greek salad, tuna sandwich:L, turkey sandwich:L,
        chicken wrap:L, veggie stir fry, chicken curry, beef stew:D, chili con carne,
        spaghetti bolognese:D, lasagna:D, vegetable soup, lentil soup, tomato soup, chicken
        noodle soup, sushi roll, poke bowl, buddha bowl, burrito bowl, shepherd's pie:D, mac
        and cheese!, mushroom risotto:D, paella:D, ramen, frozen dinner!, quiche, breakfast
        burrito:B, overnight oats:B, chicken and rice
    """,
    ),
}
FIRST_FOOD_ID = 1001

CONTENT_TOPICS = ("recipe", "workout", "mindset", "sleep", "nutrition")
N_CONTENT = 100

FIRST_NAMES = tuple(
    "Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kara Liam Maya Noah Olivia Paul "
    "Quinn Rosa Sam Tara Umar Vera Will Xena Yara Zoe Aaron Bianca Chris Diana Ethan Fatima "
    "George Hannah Ivan Julia Kevin Laura Marco Nina Oscar Priya Raj Sofia Tom Ursula Victor "
    "Wendy Yusuf Alice Bruno Chloe Daniel Elena Frank Gina Henry Isabel Jonas Kim Lucas Mia "
    "Nathan Omar Petra Ravi Sara Theo Uma Valerie Walter Amir Beth Caleb Dana Eli Fiona Gabe "
    "Helen Isaac Jade Kyle Lena Miguel Nora Owen Pia Rob Sienna Tim Val Wes Ada Boris Cora "
    "Dev Eva Finn Gwen Hank Ines Joel Kai Lola Max Nell Otto Pam Rex Sue Ty Lou Meg Ana Leo".split()
)
# Trip destinations, as users name them.
CITIES = _items("""
    Lisbon, Madrid, Barcelona, Paris, Rome, Milan, Berlin, Munich, Vienna, Prague,
    Amsterdam, Brussels, London, Dublin, Edinburgh, Copenhagen, Stockholm, Oslo, Helsinki,
    Warsaw, Budapest, Athens, Istanbul, Porto, Seville, Nice, Zurich, Geneva, Florence,
    Venice, New York, Boston, Chicago, Denver, Austin, Seattle, San Francisco, Los Angeles,
    San Diego, Miami, Toronto, Montreal, Vancouver, Mexico City, Cancun, Tokyo, Seoul,
    Singapore, Bangkok, Bali, Sydney, Melbourne, Dubai, Marrakech, Cape Town, the coast,
    my parents' place, the mountains, a conference in Frankfurt, a wedding in Napa
""")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Catalog:
    """The food catalog as arrays (row i describes food_ids[i]) plus per-slot pools."""

    foods: pd.DataFrame  # food_id, name, category: the foods.parquet side table
    food_ids: np.ndarray  # (F,) int64
    names: np.ndarray  # (F,) object: food names
    junk: np.ndarray  # (F,) bool: snacks, sweets, fast food, soda, alcohol
    slots: np.ndarray  # (F, 4) bool: suitable for breakfast / lunch / dinner / snack
    popularity: np.ndarray  # (F,) float, sums to 1: global taste of the population

    def pool(self, slot: int, junk: bool) -> np.ndarray:
        """Catalog rows suitable for `slot` with the given junk flag."""
        return np.flatnonzero(self.slots[:, slot] & (self.junk == junk))


@lru_cache(maxsize=1)
def food_catalog() -> Catalog:
    """Parse `_FOODS` into arrays. Ids are shuffled with a fixed seed so that they carry no
    category order, like ids in a real product database."""
    names, cats, junk, slots = [], [], [], []
    for category, (default_slots, cat_junk, items) in _FOODS.items():
        for item in _items(items):
            is_junk = cat_junk or item.endswith("!")
            item = item.rstrip("!")
            name, _, codes = item.partition(":")
            codes = codes or default_slots
            names.append(name)
            cats.append(category)
            junk.append(is_junk)
            slots.append([c in codes for c in SLOT_CODES])
    n = len(names)
    fixed = np.random.default_rng(20260105)
    food_ids = FIRST_FOOD_ID + fixed.permutation(n).astype(np.int64)
    # A Zipf-like popularity: a few staples (coffee, eggs, banana...) dominate real logs.
    popularity = 1.0 / (1.0 + fixed.permutation(n)) ** 0.8
    popularity /= popularity.sum()
    foods = pd.DataFrame({FOOD_ID: food_ids, "name": names, "category": cats})
    foods = foods.sort_values(FOOD_ID, ignore_index=True)
    return Catalog(
        foods=foods,
        food_ids=food_ids,
        names=np.array(names, dtype=object),
        junk=np.array(junk),
        slots=np.array(slots, dtype=bool),
        popularity=popularity,
    )


def content_ids() -> np.ndarray:
    """Content library ids "c0001".."c0100"; item i has topic CONTENT_TOPICS[i % 5]."""
    return np.array([f"c{i + 1:04d}" for i in range(N_CONTENT)], dtype=object)
