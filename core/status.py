"""Named DIMSE status codes answered by the SCP (PS3.4 Annex B, PS3.7 Annex C)."""

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110  # a bug in the node's handler: this request fails, the association goes on
UNRECOGNIZED_OPERATION = 0x0211  # a command the SCP does not serve on that presentation context
SOP_CLASS_NOT_SUPPORTED = 0x0122  # a C-STORE whose SOP class is not its presentation context's
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
ELEMENTS_DISCARDED = 0xB006  # a C-STORE warning: stored, without elements the peer may not send
DOES_NOT_MATCH_WARNING = 0xB007  # a C-STORE warning: stored as sent, but it does not match its SOP class

# A-ASSOCIATE-RJ results and (result, source, reason) triples, PS3.8 9.3.4.
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
REJECT_CALLING_AE = (REJECTED_PERMANENT, 0x01, 0x03)  # permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (REJECTED_PERMANENT, 0x01, 0x07)  # permanent, service-user, called AE not recognised
REJECT_TOO_MANY = (REJECTED_TRANSIENT, 0x03, 0x02)  # transient, service-provider (presentation), local limit

# C-STORE answers we act on as a storage SCU (PS3.4 B.2.3, PS3.7 C.4.1).
WARNING_GENERAL = 0x0001
WARNING_ATTRIBUTE_LIST = 0x0107
WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
# B000 coercion, B006 elements discarded, B007 does not match SOP class, any other Bxxx a PACS uses
STORAGE_WARNINGS = range(0xB000, 0xC000)
GENERAL_WARNINGS = frozenset({WARNING_GENERAL, WARNING_ATTRIBUTE_LIST, WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE})


def stored(status: int | None) -> bool:
    """Whether a C-STORE answer means the peer kept the instance: success, or a warning after
    which the object is stored (Bxxx, and the general 0001, 0107, 0116). Everything else (A7xx
    out of resources, A9xx, Cxxx, other failures, no answer at all) is a failure."""
    if status is None:
        return False
    return status == SUCCESS or status in STORAGE_WARNINGS or status in GENERAL_WARNINGS
