"""Patient names per DICOM Specific Character Set.

Each entry pairs a ``SpecificCharacterSet`` value (as pydicom takes it: a str
or a list for multi-valued code extensions) with a unicode PatientName that the
character set can encode. pydicom encodes these on write and decodes them on
read back to the same unicode string (checked in ``tests/synth``).
"""

from __future__ import annotations

from dataclasses import dataclass

Charset = str | list[str]


@dataclass(frozen=True)
class NamedCharset:
    """A character set and the names the generator may give its patients."""

    charset: Charset
    names: tuple[str, ...]


#: One entry per non-ASCII character set; every archive has at least one
#: patient of each.
NON_ASCII: tuple[NamedCharset, ...] = (
    NamedCharset("ISO_IR 100", ("Müller^Jürgen", "Lefèvre^Amélie", "Sørensen^Åse", "Núñez^José")),
    NamedCharset("ISO_IR 192", ("Nguyễn^Thị Minh Khai", "Øster^Zoë=王^小明", "Dvořák^Řehoř")),
    NamedCharset("GB18030", ("Wang^XiaoDong=王^小东", "李^华", "张^伟")),
    NamedCharset(["", "ISO 2022 IR 87"], ("Yamada^Tarou=山田^太郎=やまだ^たろう",)),
    NamedCharset(["ISO 2022 IR 13", "ISO 2022 IR 87"], ("ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",)),
    NamedCharset(["", "ISO 2022 IR 149"], ("Hong^Gildong=洪^吉洞=홍^길동",)),
    NamedCharset("ISO_IR 144", ("Иванов^Иван", "Смирнова^Ольга")),
    NamedCharset("ISO_IR 126", ("Παπαδόπουλος^Γιώργος", "Νικολάου^Ελένη")),
    NamedCharset("ISO_IR 127", ("قباني^لنزار",)),
    NamedCharset("ISO_IR 138", ("שרון^דבורה",)),
)

LATIN1 = NON_ASCII[0]

ASCII_FAMILY = (
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Wilson",
    "Anderson",
    "Taylor",
    "Thomas",
    "Moore",
    "Martin",
    "Jackson",
    "White",
    "Harris",
    "Clark",
    "Lewis",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Green",
    "Baker",
    "Adams",
    "Nelson",
    "Hill",
    "Campbell",
    "Mitchell",
)
ASCII_GIVEN = (
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Daniel",
    "Nancy",
    "Matthew",
    "Lisa",
)
PHYSICIANS = ("House^Gregory^^Dr", "Grey^Meredith^^Dr", "Shepherd^Derek^^Dr", "Kildare^James^^Dr")


def charset_value(charset: Charset) -> str:
    """Return the charset as it reads in a DICOM header (``\\``-joined)."""
    return charset if isinstance(charset, str) else "\\".join(charset)
