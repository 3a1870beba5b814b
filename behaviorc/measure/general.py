"""General text for measuring forgetting when a spec names none.

The general-data NLL before and after training (or with steering on) says whether a
behavior cost the model its ordinary language. These sentences are plain, varied and
fixed, so the figure is comparable between builds.
"""

DEFAULT_GENERAL_TEXTS: tuple[str, ...] = (
    "The river runs slowly past the old stone bridge.",
    "She opened the window to let the morning air into the room.",
    "A small boat drifted across the lake at sunset.",
    "The baker sold all of the bread before noon.",
    "He wrote the address on the back of the envelope.",
    "Rain fell on the roof for most of the night.",
    "The library is quiet in the early afternoon.",
    "Children played in the park until the street lights came on.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "A cold wind blew in from the sea.",
    "The train arrived ten minutes after it was due.",
    "Our neighbor grows tomatoes and beans in her garden.",
    "The museum opens at nine on weekdays.",
    "He fixed the chair with a few nails and some glue.",
    "The mountain path was steep and covered with loose stones.",
    "They planted an apple tree beside the house.",
    "The old clock in the hall strikes every hour.",
    "A cup of tea is a good way to start the day.",
    "The market is busy on Saturday mornings.",
    "She learned to swim in the lake near her grandmother's farm.",
    "Snow covered the fields and the roads by morning.",
    "The teacher wrote the date at the top of the board.",
    "Most birds fly south before the winter comes.",
    "The shop on the corner sells newspapers and sweets.",
    "He likes to read the paper with his breakfast.",
    "The ferry crosses the bay twice a day.",
    "A map of the city hangs on the kitchen wall.",
    "The dog waited by the door for its owner to come home.",
    "The soup tastes better the day after it is made.",
    "Leaves turn yellow and red as the nights grow colder.",
    "The concert ended with a long round of applause.",
    "She kept her notes in a blue folder.",
    "The bridge was closed for repairs during the summer.",
    "A bright moon lit the path through the woods.",
    "The farmer checked the fences after the storm.",
    "Fresh paint takes a day to dry in damp weather.",
    "The students walked to the station after class.",
    "An old radio played music in the workshop.",
    "The harbor was full of fishing boats at dawn.",
    "He packed a sandwich and an apple for the trip.",
)
