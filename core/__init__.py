"""The small core every other package stands on (DESIGN 6): it imports none of them."""
