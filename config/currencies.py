# The currencies money can be in: ISO 4217's active codes (funds and precious metals
# included; the testing code XTS and "no currency" XXX left out). A plan's prices,
# fees and allocated value are in its currency; amounts in different currencies are
# never added (see control_plane.reports).
from __future__ import annotations

from typing import Annotated

import msgspec

CURRENCY_PATTERN = r"^[A-Z]{3}$"
CURRENCY_MEANING = "a three-letter currency code like `USD`"
CurrencyCode = Annotated[str, msgspec.Meta(pattern=CURRENCY_PATTERN)]

ISO_4217 = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD
BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP
DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR
IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD
MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB
PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD
SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS
VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA YER
ZAR ZMW ZWG ZWL
""".split())


def currency_problem(code: str) -> str | None:
    """Why `code` (three capital letters) is no currency money can be in; None when it is one."""
    if code in ISO_4217:
        return None
    return f"`{code}` is not an ISO 4217 currency code (like `USD`, `EUR`, `JPY`)"
