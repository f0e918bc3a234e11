"""Named DIMSE status codes answered by the SCP (PS3.4 Annex B, PS3.7 Annex C)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called AE not recognised
REJECT_TOO_MANY = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit
