"""Hostile and malformed input to the client endpoints.

Each request is refused with its status code and a problem document that names the field and
the rule (and the valid values, for a closed set); none is a 500, and none stores a row or a
file or enqueues a recalculation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from services.scoring import REQUIREMENTS
from tests.harness.api import TenantClient, api_settings, new_tenant, running_api
from tests.harness.archives import MiB, bomb_zip, nested_zip, symlink_zip, traversal_zip, zip_of
from tests.harness.pdf import make_pdf
from tests.integration.test_client_api import everything

GAS_PDF = make_pdf(["Landlord Gas Safety Record", "Expiry date: 12 March 2027"])
TEXT = b"Electrical Installation Condition Report\n"


@dataclass(frozen=True)
class World:
    api: TestClient
    database_url: str
    store_dir: Path
    tenant: TenantClient

    @property
    def documents_url(self) -> str:
        return f"/api/properties/{self.tenant.property_ids[0]}/documents"


@pytest.fixture(scope="module")
def world(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One app and database for the module: every test here checks that it changed nothing."""
    store_dir = tmp_path_factory.mktemp("hostile") / "documents"
    with running_api(api_settings(module_database_url, store_dir)) as api:
        yield World(api, module_database_url, store_dir, new_tenant(module_database_url))


@contextmanager
def nothing_changes(world: World) -> Iterator[None]:
    before = everything(world.database_url, world.store_dir)
    yield
    assert everything(world.database_url, world.store_dir) == before


def assert_problem(response: httpx.Response, status: int, field: str, rule: str) -> dict[str, Any]:
    """The problem document names `field` and `rule`; returns that error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status
    matching = [e for e in body["errors"] if (e["field"], e["rule"]) == (field, rule)]
    assert matching, f"no error for field {field!r} and rule {rule!r} in {body['errors']}"
    return matching[0]


def upload(world: World, *, content: bytes = TEXT, name: str = "eicr.txt", content_type: str | None = None,
           data: dict[str, Any] | None = None) -> httpx.Response:
    file = (name, content, content_type) if content_type else (name, content)
    return world.api.post(world.documents_url, files={"file": file},
                          data=data if data is not None else {"requirement_code": "eicr"},
                          headers=world.tenant.headers)


def upload_zip(world: World, archive: bytes) -> httpx.Response:
    return world.api.post(f"{world.documents_url}/zip", files={"archive": ("docs.zip", archive, "application/zip")},
                          headers=world.tenant.headers)


# -- values --------------------------------------------------------------------------------

def test_an_unknown_requirement_type_is_refused_with_the_valid_values_listed(world: World) -> None:
    with nothing_changes(world):
        response = upload(world, data={"requirement_code": "boiler_service"})

    error = assert_problem(response, 422, "requirement_code", "literal_error")
    assert error["valid_values"] == list(REQUIREMENTS)


def test_an_unknown_requirement_type_in_a_bulk_upload_is_refused_naming_its_position(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post(
            f"{world.documents_url}/bulk", files=[("files", ("a.txt", TEXT)), ("files", ("b.txt", b"b\n"))],
            data={"requirement_codes": ["eicr", "boiler_service"]}, headers=world.tenant.headers)

    error = assert_problem(response, 422, "requirement_codes.1", "literal_error")
    assert error["valid_values"] == list(REQUIREMENTS)


@pytest.mark.parametrize("value", ["2027-02-30", "2027-13-01", "31/12/2027", "1700000000"])
def test_an_impossible_or_misformatted_expiry_date_is_refused_naming_expires_at(world: World, value: str) -> None:
    with nothing_changes(world):
        response = upload(world, data={"requirement_code": "eicr", "expires_at": value})

    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["expires_at"]


def test_a_bulk_upload_whose_requirement_codes_do_not_match_its_files_one_to_one_is_refused(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post(
            f"{world.documents_url}/bulk", files=[("files", ("a.txt", TEXT)), ("files", ("b.txt", b"b\n"))],
            data={"requirement_codes": ["eicr"]}, headers=world.tenant.headers)

    assert_problem(response, 422, "requirement_codes", "one_per_file")


def test_a_bulk_upload_whose_expiry_dates_do_not_match_its_files_one_to_one_is_refused(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post(
            f"{world.documents_url}/bulk", files=[("files", ("a.txt", TEXT)), ("files", ("b.txt", b"b\n"))],
            data={"requirement_codes": ["eicr", "epc"], "expires_at": ["2030-01-01", "", "2031-01-01"]},
            headers=world.tenant.headers)

    assert_problem(response, 422, "expires_at", "one_per_file")


# -- files ---------------------------------------------------------------------------------

def test_a_file_over_the_size_limit_is_refused_with_413(world: World, tmp_path: Path) -> None:
    settings = api_settings(world.database_url, tmp_path / "small", max_file_bytes=1024)
    with running_api(settings) as small, nothing_changes(world):
        response = small.post(world.documents_url, files={"file": ("big.txt", b"a" * 1025)},
                              data={"requirement_code": "eicr"}, headers=world.tenant.headers)

    assert_problem(response, 413, "file", "max_size")
    assert not (tmp_path / "small").exists() or not any((tmp_path / "small").rglob("*"))


def test_more_files_than_the_limit_in_one_bulk_upload_are_refused(world: World) -> None:
    limit = world.api.app.state.upload_limits.max_files
    files = [("files", (f"f{i}.txt", b"x%d\n" % i)) for i in range(limit + 1)]

    with nothing_changes(world):
        response = world.api.post(f"{world.documents_url}/bulk", files=files,
                                  data={"requirement_codes": ["eicr"] * (limit + 1)}, headers=world.tenant.headers)

    assert_problem(response, 422, "files", "max_items")


def test_an_empty_file_is_refused(world: World) -> None:
    with nothing_changes(world):
        response = upload(world, content=b"", name="empty.txt")

    assert_problem(response, 422, "file", "not_empty")


@pytest.mark.parametrize(("content", "name", "content_type"), [
    (b"%PDF-1.4\nthis is not really a pdf\n%%EOF\n", "cert.pdf", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "cert.pdf", "application/pdf"),
    (TEXT, "cert.pdf", "application/pdf"),
    (TEXT, "cert.txt", "application/pdf"),
], ids=["broken pdf", "png named pdf", "text named pdf", "text declared pdf"])
def test_content_that_is_not_the_pdf_it_claims_to_be_is_refused_with_415(
    world: World, content: bytes, name: str, content_type: str
) -> None:
    with nothing_changes(world):
        response = upload(world, content=content, name=name, content_type=content_type)

    assert response.status_code == 415, response.text
    [error] = response.json()["errors"]
    assert error["field"] == "file"
    assert error["rule"] in {"content_type", "declared_type_matches_content", "name_matches_content"}
    assert set(error["valid_values"]) == {"application/pdf", "text/plain"}


@pytest.mark.parametrize("name", ["Flat \u202e1", "Flat\u200f 1", "Flat\u2029 1", "Flat\x07 1"],
                         ids=["bidi override", "right-to-left mark", "paragraph separator", "bell"])
def test_a_property_name_with_characters_that_hide_or_reorder_it_is_refused(world: World, name: str) -> None:
    with nothing_changes(world):
        response = world.api.post("/api/properties", json={"name": name}, headers=world.tenant.headers)

    assert_problem(response, 422, "name", "printable_text")


def test_a_file_name_with_control_characters_is_refused(world: World) -> None:
    with nothing_changes(world):
        response = upload(world, name="cert\u202efdp.txt")

    assert_problem(response, 422, "file_name", "no_control_characters")


# -- zip archives --------------------------------------------------------------------------

@pytest.mark.parametrize(("archive", "rule"), [
    (bomb_zip(5 * MiB), "zip_bomb"),
    (bomb_zip(200 * MiB), "max_size"),
], ids=["inflates 1000x under the file limit", "inflates to 200 MiB"])
def test_a_zip_bomb_is_refused_with_413(world: World, archive: bytes, rule: str) -> None:
    with nothing_changes(world):
        response = upload_zip(world, archive)

    assert_problem(response, 413, "archive", rule)


@pytest.mark.parametrize("name", ["../gas_safety/evil.txt", "/etc/gas_safety.txt", "gas_safety/../../evil.txt",
                                  "C:/gas_safety/evil.txt", "gas_safety\\..\\evil.txt"])
def test_a_zip_entry_whose_path_leaves_the_archive_is_refused_and_nothing_is_stored(world: World, name: str) -> None:
    with nothing_changes(world):
        response = upload_zip(world, traversal_zip(name))

    assert_problem(response, 422, "archive", "safe_path")


def test_a_zip_symlink_entry_is_refused(world: World) -> None:
    with nothing_changes(world):
        response = upload_zip(world, symlink_zip())

    assert_problem(response, 422, "archive", "safe_path")


def test_a_zip_inside_a_zip_is_refused_with_415(world: World) -> None:
    with nothing_changes(world):
        response = upload_zip(world, nested_zip())

    assert_problem(response, 415, "archive", "nested_archive")


def test_a_zip_with_one_good_and_one_unsafe_entry_stores_neither(world: World) -> None:
    archive = zip_of([("gas_safety/cert.pdf", GAS_PDF), ("eicr/notes.txt", b"\x00\x01binary")])

    with nothing_changes(world):
        response = upload_zip(world, archive)

    assert_problem(response, 415, "archive", "content_type")


def test_an_upload_that_is_not_a_zip_is_refused_with_415(world: World) -> None:
    with nothing_changes(world):
        response = upload_zip(world, GAS_PDF)

    assert_problem(response, 415, "archive", "content_type")


# -- requests ------------------------------------------------------------------------------

def test_malformed_json_is_refused_with_400(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post("/api/properties", content=b'{"name": "Flat', headers=world.tenant.headers | {
            "Content-Type": "application/json"})

    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["rule"] == "json_invalid"


def test_an_unknown_field_is_refused_as_extra_forbidden(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post("/api/properties", json={"name": "Flat", "colour": "blue"},
                                  headers=world.tenant.headers)

    assert_problem(response, 422, "colour", "extra_forbidden")


@pytest.mark.parametrize("body", [
    {"name": ""}, {"name": "   "}, {"name": "x" * 201}, {"name": "Fl\x00at"}, {"name": "\ud800"},
    {"name": "Flat", "has_gas_supply": "maybe"}, {"name": "Flat", "has_gas_supply": 0}, {}, [], "Flat",
], ids=["empty name", "blank name", "long name", "NUL in name", "lone surrogate", "not a boolean", "0 for false",
        "no name", "a list", "a string"])
def test_a_property_body_that_breaks_a_rule_is_refused_with_422(world: World, body: Any) -> None:
    with nothing_changes(world):
        response = world.api.post("/api/properties", content=json.dumps(body).encode(),
                                  headers=world.tenant.headers | {"Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    assert response.json()["errors"]


def test_json_sent_as_another_content_type_is_refused_with_415(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post("/api/properties", content=b'{"name": "Flat"}',
                                  headers=world.tenant.headers | {"Content-Type": "text/plain"})

    error = assert_problem(response, 415, "header.Content-Type", "media_type")
    assert error["valid_values"] == ["application/json"]


def test_an_upload_sent_as_json_is_refused_with_415(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post(world.documents_url, json={"file": "x", "requirement_code": "eicr"},
                                  headers=world.tenant.headers)

    error = assert_problem(response, 415, "header.Content-Type", "media_type")
    assert error["valid_values"] == ["multipart/form-data"]


def test_a_huge_content_length_is_refused_with_413_before_the_body_is_read(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post(world.documents_url, content=b"x",
                                  headers=world.tenant.headers | {"Content-Length": str(10**12),
                                                                  "Content-Type": "multipart/form-data; boundary=b"})

    assert_problem(response, 413, "body", "max_size")


@pytest.mark.parametrize(("path", "field"), [
    ("/api/properties/9223372036854775808", "path.property_id"),
    ("/api/properties/0", "path.property_id"),
    ("/api/properties/abc", "path.property_id"),
    ("/api/properties/1/documents/0/ai-suggestion", "path.document_id"),
    ("/api/properties/1/documents/9223372036854775808/ai-suggestion", "path.document_id"),
], ids=["beyond bigint", "zero", "not a number", "document zero", "document beyond bigint"])
def test_an_id_that_cannot_exist_is_refused_with_422_naming_it(world: World, path: str, field: str) -> None:
    response = world.api.get(path, headers=world.tenant.headers)

    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"after_id": -1}, {"limit": "ten"},
                                    {"limt": 10}])
def test_a_page_request_out_of_range_or_with_an_unknown_parameter_is_refused_with_422(
    world: World, params: dict[str, Any]
) -> None:
    response = world.api.get("/api/properties", params=params, headers=world.tenant.headers)

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == f"query.{next(iter(params))}"


def test_an_idempotency_key_with_spaces_is_refused_with_400_naming_the_header(world: World) -> None:
    with nothing_changes(world):
        response = world.api.post("/api/properties", json={"name": "Flat"},
                                  headers=world.tenant.headers | {"Idempotency-Key": "has spaces"})

    assert_problem(response, 400, "header.Idempotency-Key", "format")
