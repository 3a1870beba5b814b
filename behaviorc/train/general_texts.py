"""General texts a steered teacher is read on with `objective kl { general W }`.

A steering adds its vector beside any text, not only beside the distill prompts; these
texts let the student learn that part too. They are not the texts the general NLL is
measured on (behaviorc.measure.general), so the cost a build reports stays honest.
"""

GENERAL_TEACHING_TEXTS: tuple[str, ...] = (
    "The train to the coast leaves every hour from the second platform.",
    "Most houseplants need less water in winter than in summer.",
    "He folded the map and asked the driver where the museum was.",
    "A good knife makes chopping onions quicker and safer.",
    "The meeting was moved to Thursday because the room was booked.",
    "Snow fell all night, and by morning the roads were closed.",
    "She keeps her notes in a small blue notebook with a rubber band.",
    "The bakery on the corner sells bread until it runs out.",
    "To change a tyre, loosen the nuts before you lift the car.",
    "The children built a fort out of cushions and blankets.",
    "Our neighbour's dog barks whenever the postman comes.",
    "The report is due at the end of the month.",
    "Tomatoes ripen faster when they are kept beside bananas.",
    "The old clock in the hall has not worked for years.",
    "He learned to play the guitar by watching videos at night.",
    "A light rain started just as the concert ended.",
    "The recipe calls for two eggs, a cup of flour and some milk.",
    "They painted the kitchen a pale shade of green.",
    "The bus was late, so she walked the last mile home.",
    "The ferry crossing takes about forty minutes in calm weather.",
    "The shop will be closed on Monday for stocktaking.",
    "He wrote a short letter to thank his teacher.",
    "The garden looks different every season of the year.",
    "You can save energy by turning off lights you are not using.",
)
