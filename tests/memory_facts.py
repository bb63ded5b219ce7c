"""A known-answer set for recall: facts with an exact id each, a paraphrased question that
should find the fact, and generated distractors in the same vocabulary."""

from __future__ import annotations

import random

# (id token, fact, paraphrased question)
FACTS: list[tuple[str, str, str]] = [
    ("KB-101", "Refunds for duplicate card charges are issued within 5 business days.",
     "how long does a refund take when my card was charged twice"),
    ("KB-102", "Invoices can be downloaded from Settings, Billing, Invoice history.",
     "where do I download an old invoice"),
    ("KB-201", "Locked accounts unlock automatically 30 minutes after the last failed login.",
     "my account got locked after failed logins, when does it unlock"),
    ("KB-202", "Password reset links are sent to the primary email address of the account.",
     "which email address receives the password reset link"),
    ("KB-301", "Export failures with error 500 are fixed in release 4.2; export by month as a workaround.",
     "exporting fails with a 500 error, is there a fix or workaround"),
    ("KB-302", "Crash reports are attached from Help, Send diagnostics.",
     "how can I attach a crash report"),
    ("KB-401", "Tables export to CSV with the Export button in any table view.",
     "can I export a table as CSV"),
    ("KB-901", "Support hours are 08:00 to 20:00 CET on weekdays.",
     "what hours is support open on weekdays"),
    ("ORD-7731", "Order ORD-7731 shipped from the Rotterdam warehouse by courier.",
     "which warehouse shipped the courier order"),
    ("ORD-5120", "Order ORD-5120 was cancelled by the customer before payment.",
     "was the order cancelled before it was paid"),
    ("CUST-88", "Customer Ada Lovelace prefers to be contacted by phone in the morning.",
     "how does Ada like to be contacted"),
    ("CUST-91", "Customer Grace Hopper manages the enterprise plan for her navy team.",
     "who manages the enterprise plan for the navy team"),
    ("PLAN-3", "The enterprise plan includes single sign-on and a 99.9 percent uptime guarantee.",
     "does the enterprise plan include single sign-on"),
    ("PLAN-1", "The free plan is limited to three projects and one gigabyte of storage.",
     "how many projects can I create on the free plan"),
    ("SEC-12", "Two-factor authentication codes expire after 30 seconds.",
     "when do two-factor codes expire"),
    ("SEC-14", "API tokens can be revoked from the developer settings page.",
     "how do I revoke an API token"),
    ("INC-2041", "Incident INC-2041 was a database failover that delayed emails for two hours.",
     "what caused the delayed emails incident"),
    ("INC-2077", "Incident INC-2077 was a certificate expiry that broke the mobile app login.",
     "why did login break on the mobile app"),
    ("HR-5", "New employees receive their laptop on the first day from the IT desk.",
     "when do new employees get a laptop"),
    ("HR-9", "Vacation requests need manager approval two weeks in advance.",
     "how far in advance must vacation be approved"),
    ("OPS-33", "Backups of the production database run every night at 02:00 UTC.",
     "when do the nightly database backups run"),
    ("OPS-35", "Backups are kept for 35 days and then deleted.",
     "how many days are backups kept"),
    ("BILL-7", "Annual billing gives a 20 percent discount over monthly billing.",
     "is there a discount for annual billing"),
    ("BILL-8", "VAT is added to invoices for customers in the European Union.",
     "do invoices include VAT for European customers"),
    ("DEV-4", "The public API is rate limited to 600 requests per minute per token.",
     "what is the API rate limit per minute"),
    ("DEV-6", "Webhooks are retried five times with exponential backoff.",
     "how often are failed webhooks retried"),
    ("MOB-2", "The mobile app supports offline mode for reading saved reports.",
     "can I read saved reports offline on mobile"),
    ("MOB-3", "Push notifications can be muted per project in the app settings.",
     "how do I mute push notifications for one project"),
    ("LEG-1", "Customer data is stored in Frankfurt and never leaves the European Union.",
     "where is customer data stored"),
    ("LEG-2", "Accounts are deleted 90 days after a closure request.",
     "how long after closing is my account deleted"),
]  # fmt: skip

_WORDS = tuple(
    [
        "report",
        "project",
        "invoice",
        "account",
        "team",
        "export",
        "billing",
        "plan",
        "customer",
        "order",
        "warehouse",
        "login",
        "email",
        "password",
        "backup",
        "database",
        "mobile",
        "app",
        "token",
        "webhook",
        "support",
        "refund",
        "payment",
        "storage",
        "settings",
        "security",
        "incident",
        "release",
        "error",
        "page",
        "view",
        "table",
        "discount",
        "region",
        "data",
    ]
)


def distractors(n: int, seed: int = 7) -> list[str]:
    """Sentences in the same vocabulary that answer none of the questions."""
    rng = random.Random(seed)
    return [
        f"Note {i}: the {rng.choice(_WORDS)} {rng.choice(_WORDS)} was reviewed with the "
        f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} team in week {rng.randint(1, 52)}."
        for i in range(n)
    ]
