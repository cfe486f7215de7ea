"""Flickr30K's concept groups: the task split of a dataset without category labels.

Flickr30K has captions and no object labels, so its tasks are cut by
concept groups found in the captions. Each group is a list of words
(singular and plural forms written out), matched as whole words of the
normalised caption text (:func:`~ccmr_jax.data.examples.normalize_caption`).
The groups, in stream order::

  animals        dogs, cats, horses, birds, farm and wild animals
  vehicles       cars, bikes, motorcycles, buses, trains, planes
  sports         ball games, players, skating, skiing, racing, climbing
  water          beach, sea, lake, river, pool, swimming, surfing, boats
  people_street  streets, cities, crowds, markets, shops; and every image no group names

Rules (deterministic, from the captions alone):
  * Every occurrence of a group's word in any of the image's captions is one
    vote for that group; the image joins the group with most votes, a tie
    going to the earlier group above (so "a dog runs on the beach" ×5 is
    ``animals``; "a soccer game on the beach" is ``sports``).
  * An image whose captions name no group joins ``people_street``, the last
    group: Flickr30K is mostly photos of people in everyday scenes, and
    these are such photos. No image is dropped.

Each group is one "category" of :class:`~ccmr_jax.data.examples.Dataset`,
and an image's labels are its votes (:func:`concept_labels`), so
:func:`~ccmr_jax.data.task_split.split_into_tasks` cuts the stream by its
usual majority vote: the default is one task per group (5 tasks).

The TFDS builder that prepares the images and captions is
:mod:`ccmr_jax.data.flickr30k_builder`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ccmr_jax.data.examples import normalize_caption

CONCEPT_GROUPS: dict[str, frozenset[str]] = {
    "animals": frozenset("""
        animal animals dog dogs puppy puppies cat cats kitten kittens horse horses pony ponies cow cows cattle
        bull bulls calf sheep lamb lambs goat goats pig pigs bird birds duck ducks goose geese swan swans
        chicken chickens pigeon pigeons seagull seagulls parrot parrots donkey donkeys mule mules camel camels
        elephant elephants monkey monkeys deer rabbit rabbits squirrel squirrels bear bears llama llamas ox oxen
        fish poodle terrier retriever collie beagle dalmatian labrador chihuahua greyhound
        """.split()),
    "vehicles": frozenset("""
        car cars truck trucks bus buses bike bikes bicycle bicycles motorcycle motorcycles motorbike motorbikes
        scooter scooters moped train trains tram trolley subway taxi taxis van vans jeep tractor tractors
        vehicle vehicles suv airplane airplanes plane planes jet helicopter ambulance limo limousine rickshaw
        cyclist cyclists biker bikers
        """.split()),
    "sports": frozenset("""
        sport sports ball soccer football basketball baseball volleyball tennis golf hockey rugby cricket
        softball lacrosse player players team teams game match goalie referee pitcher batter catcher racket
        racquet skateboard skateboarder skateboarders skateboarding skater skaters skating snowboard
        snowboarder snowboarding ski skier skiers skiing race racing racer runner runners marathon athlete
        athletes wrestler wrestlers wrestling boxer boxers boxing karate gymnast gymnasts climber climbers
        climbing rodeo bmx stadium jersey jerseys tackle tackles tackled kicks kicking dribbles
        """.split()),
    "water": frozenset("""
        water beach beaches ocean sea lake river pool swimming swim swims swimmer swimmers wave waves surf
        surfer surfers surfing surfboard boat boats kayak kayaks kayaking canoe canoes raft rafting sailboat
        sailing fountain splash splashes splashing shore waterfall creek pond dock pier diving diver divers
        underwater sand sandy
        """.split()),
    "people_street": frozenset("""
        street streets city sidewalk sidewalks crowd crowded crowds building buildings market markets shop
        shops store stores storefront restaurant cafe road downtown alley crosswalk intersection traffic
        parade vendor vendors urban plaza town neighborhood
        """.split()),
}
GROUP_NAMES: tuple[str, ...] = tuple(CONCEPT_GROUPS)
FALLBACK_GROUP = GROUP_NAMES.index("people_street")

_WORD_GROUP = {word: g for g, words in enumerate(CONCEPT_GROUPS.values()) for word in words}


def concept_labels(captions: Sequence[str]) -> np.ndarray:
  """One image's votes: the group of every group word in its captions, or the fallback group.

  Args:
    captions: the image's caption texts.

  Returns:
    ``int32`` group indices into :data:`GROUP_NAMES`, one per matched word
    occurrence; ``[FALLBACK_GROUP]`` when no caption names any group.
  """
  votes = [_WORD_GROUP[w] for text in captions for w in normalize_caption(text).split() if w in _WORD_GROUP]
  return np.asarray(votes if votes else [FALLBACK_GROUP], np.int32)


def names_a_group(captions: Sequence[str]) -> bool:
  """Whether any of an image's captions holds a word of some concept group."""
  return any(w in _WORD_GROUP for text in captions for w in normalize_caption(text).split())


def category_groups() -> dict[str, tuple[int, ...]]:
  """``{group name: (group index,)}``: each concept group is one category, in stream order."""
  return {name: (i,) for i, name in enumerate(GROUP_NAMES)}
