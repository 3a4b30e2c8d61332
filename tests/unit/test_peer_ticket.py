"""Peer tickets (agent.peer.ticket) and the have-bitmap: pure, checked without a controller."""

from __future__ import annotations

import pytest

from agent.peer import ticket
from agent.peer.bitmap import MAX_CHUNKS, Have
from agent.peer.errors import KeyUnknown, PeerError, TicketInvalid

SECRET = b"s" * 32
IMAGE = "ab" * 32
OTHER = "cd" * 32
HOLDER = "m-0123456789ab"


KID = "0badcafe"


def name(epoch: int, kid: str = KID) -> str:
    return ticket.key_name(kid, epoch)


def issue(digest: str = IMAGE, expires: int = 1000, epoch: int = 7) -> tuple[str, dict[str, bytes]]:
    key = ticket.fleet_key(SECRET, digest, epoch)
    return ticket.encode(ticket.Ticket(digest, HOLDER, epoch, expires, KID), key), {name(epoch): key}


def test_a_ticket_verifies_under_its_image_key_until_it_expires() -> None:
    text, keys = issue()
    got = ticket.verify(text, keys, IMAGE, now=999.5)
    assert (got.holder, got.digest, got.expires) == (HOLDER, IMAGE, 1000)


def test_expired_and_replayed_after_expiry_are_refused() -> None:
    text, keys = issue(expires=1000)
    ticket.verify(text, keys, IMAGE, now=10)
    for now in (1000, 1001, 5000):  # the same bytes, sent again later
        with pytest.raises(TicketInvalid, match="expired"):
            ticket.verify(text, keys, IMAGE, now=now)


def test_a_ticket_for_another_image_is_refused_even_under_a_key_that_signed_it() -> None:
    text, _ = issue(digest=OTHER)
    # a peer serving IMAGE holds IMAGE's key: OTHER's ticket does not match it
    with pytest.raises(TicketInvalid, match="MAC does not match"):
        ticket.verify(text, {name(7): ticket.fleet_key(SECRET, IMAGE, 7)}, IMAGE, now=0)
    # and under OTHER's own key it is still not a ticket for IMAGE
    with pytest.raises(TicketInvalid, match="issued for image cdcd"):
        ticket.verify(text, {name(7): ticket.fleet_key(SECRET, OTHER, 7)}, IMAGE, now=0)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace(HOLDER, "m-0123456789ac"),  # another holder
        lambda t: t.replace(".1000.", ".9999."),  # a later expiry
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # the MAC itself
    ],
)
def test_a_tampered_ticket_is_refused(edit: object) -> None:
    text, keys = issue()
    bad = edit(text)  # type: ignore[operator]
    assert bad != text
    with pytest.raises(TicketInvalid, match="MAC does not match"):
        ticket.verify(bad, keys, IMAGE, now=0)


@pytest.mark.parametrize("cut", [0, 1, 10, 70, -1, -20])
def test_truncated_or_malformed_tickets_are_refused(cut: int) -> None:
    text, keys = issue()
    with pytest.raises(TicketInvalid, match="expected"):
        ticket.verify(text[:cut], keys, IMAGE, now=0)
    for junk in ("", "t1." + "x" * 300, text + ".extra", text.replace(".", "/", 1)):
        with pytest.raises(TicketInvalid):
            ticket.verify(junk, keys, IMAGE, now=0)


def test_a_key_of_another_epoch_or_controller_does_not_verify() -> None:
    text, _ = issue(epoch=7)
    with pytest.raises(KeyUnknown, match=f"key {KID}.7 unknown"):
        ticket.verify(text, {name(8): ticket.fleet_key(SECRET, IMAGE, 8)}, IMAGE, now=0)
    with pytest.raises(KeyUnknown, match="unknown"):  # another controller's key of that epoch
        ticket.verify(text, {name(7, "12345678"): ticket.fleet_key(b"t" * 32, IMAGE, 7)}, IMAGE, now=0)
    with pytest.raises(TicketInvalid, match="MAC does not match"):
        ticket.verify(text, {name(7): ticket.fleet_key(b"t" * 32, IMAGE, 7)}, IMAGE, now=0)
    assert ticket.fleet_key(SECRET, IMAGE, 7) != ticket.fleet_key(SECRET, IMAGE, 8)


def test_have_bitmap_round_trips_and_refuses_wrong_lengths() -> None:
    have = Have(20)
    for i in (0, 3, 19):
        have.add(i)
    back = Have.decode(have.encode(), 20)
    assert [i for i in range(20) if i in back] == [0, 3, 19] and len(back) == 3
    assert back.complete(0b1001) and not back.complete(0b110)
    with pytest.raises(PeerError, match="expected 3 bytes for 20 chunks, got 1"):
        Have.decode("AQ==", 20)
    with pytest.raises(PeerError, match="expected base64"):
        Have.decode("!!!!", 20)
    with pytest.raises(PeerError, match="chunks"):
        Have(MAX_CHUNKS + 1)
