"""Fresh, fully migrated databases per test, cloned from one template per session.

Relay and worker tests need committed rows seen by several connections and processes, so
each gets a real database of its own (CREATE DATABASE ... TEMPLATE is fast), never a
rolled-back transaction.
"""

from __future__ import annotations

import itertools
import os
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from recalq import migrate
from recalq.settings import Settings


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


class DatabaseFactory:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._prefix = f"recalq_t{os.getpid()}"
        self._counter = itertools.count()
        self.template = f"{self._prefix}_template"
        self._template_ready = False

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_url, autocommit=True)

    def _ensure_template(self) -> None:
        if self._template_ready:
            return
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.template)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        migrate.upgrade(Settings(database_url=with_database(self.admin_url, self.template)))
        self._template_ready = True

    def create(self) -> str:
        self._ensure_template()
        name = f"{self._prefix}_{next(self._counter)}"
        with self._admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(self.template)
                )
            )
        return with_database(self.admin_url, name)

    def create_empty(self) -> str:
        name = f"{self._prefix}_{next(self._counter)}"
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return with_database(self.admin_url, name)

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def drop_template(self) -> None:
        if self._template_ready:
            self.drop(with_database(self.admin_url, self.template))
