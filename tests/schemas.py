"""JSON schemas of real-world shapes for the structured-output tests: API payloads, records, config
files, tool arguments. Free-text strings carry a maxLength and arrays a maxItems, as production
schemas usually do, so that even a random model's output ends within the token budget."""

S = {"type": "string", "maxLength": 24}
NAME = {"type": "string", "minLength": 1, "maxLength": 20}
EMAIL = {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org|net)$"}
DATE = {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 999}
PRICE = {"type": "number", "minimum": 0, "maximum": 10000}
BOOL = {"type": "boolean"}


def obj(properties, required=None, **extra):
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    schema["required"] = list(properties) if required is None else required
    schema.update(extra)
    return schema


def arr(items, lo=0, hi=3):
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


ADDRESS = obj({"street": S, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
               "country": {"enum": ["US", "DE", "FR", "JP", "BR"]}})
PERSON = obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "email": EMAIL})

SCHEMAS = {
    "person": PERSON,
    "person_optional_email": obj({"name": NAME, "age": SMALL_INT, "email": EMAIL}, required=["name"]),
    "address": ADDRESS,
    "person_with_address": obj({"person": PERSON, "address": ADDRESS}),
    "product": obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "title": S, "price": PRICE,
                    "in_stock": BOOL}),
    "order": obj({"order_id": SMALL_INT, "items": arr(obj({"sku": NAME, "qty": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 9}}), 1, 3),
                  "total": PRICE}),
    "tags": obj({"tags": arr(NAME, 1, 4)}),
    "unique_flags": obj({"flags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}),
    "enum_status": obj({"status": {"enum": ["open", "closed", "pending"]}}),
    "enum_mixed": obj({"level": {"enum": [1, 2, 3, "max", None]}}),
    "const_version": obj({"version": {"const": "1.0"}, "name": NAME}),
    "nullable": obj({"note": {"anyOf": [S, {"type": "null"}]}}),
    "anyof_id": obj({"id": {"anyOf": [SMALL_INT, {"type": "string", "pattern": "^[a-f0-9]{8}$"}]}}),
    "oneof_shape": obj({"shape": {"anyOf": [
        obj({"kind": {"const": "circle"}, "radius": PRICE}),
        obj({"kind": {"const": "rect"}, "w": PRICE, "h": PRICE}),
    ]}}),
    "ref_tree": {
        "$defs": {"leaf": obj({"value": SMALL_INT})},
        "type": "object",
        "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
        "required": ["left", "right"], "additionalProperties": False,
    },
    "ref_list": {
        "definitions": {"point": obj({"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                      "y": {"type": "integer", "minimum": -99, "maximum": 99}})},
        "type": "object",
        "properties": {"points": arr({"$ref": "#/definitions/point"}, 1, 3)},
        "required": ["points"], "additionalProperties": False,
    },
    "number_bounds": obj({"ratio": {"type": "number", "minimum": 0, "maximum": 1}}),
    "exclusive_bounds": obj({"temp": {"type": "number", "exclusiveMinimum": -50, "exclusiveMaximum": 50}}),
    "integer_range": obj({"port": {"type": "integer", "minimum": 1024, "maximum": 65535}}),
    "date_event": obj({"title": S, "date": DATE}),
    "calendar": obj({"events": arr(obj({"title": S, "date": DATE}), 1, 2)}),
    "email_list": obj({"recipients": arr(EMAIL, 1, 3)}),
    "bool_settings": obj({"dark_mode": BOOL, "notifications": BOOL, "beta": BOOL}),
    "config_file": obj({"host": {"type": "string", "pattern": "^[a-z]{1,10}(\\.[a-z]{1,6}){0,2}$"},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "debug": BOOL,
                        "log_level": {"enum": ["debug", "info", "warning", "error"]}}),
    "http_request": obj({"method": {"enum": ["GET", "POST", "PUT", "DELETE"]},
                         "path": {"type": "string", "pattern": "^/[a-z/]{0,20}$"},
                         "headers": arr(obj({"name": NAME, "value": S}), 0, 2)}),
    "search_query": obj({"query": S, "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                         "sort": {"enum": ["relevance", "date"]}}, required=["query"]),
    "weather_args": obj({"location": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}}),
    "calculator_args": obj({"a": PRICE, "b": PRICE, "op": {"enum": ["+", "-", "*", "/"]}}),
    "sentiment": obj({"label": {"enum": ["positive", "negative", "neutral"]},
                      "score": {"type": "number", "minimum": 0, "maximum": 1}}),
    "classification_multi": obj({"labels": arr({"enum": ["spam", "ham", "promo", "social"]}, 1, 2)}),
    "entity_extraction": obj({"entities": arr(obj({"text": S, "type": {"enum": ["PER", "ORG", "LOC"]}}), 0, 3)}),
    "qa_answer": obj({"answer": S, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                      "sources": arr(SMALL_INT, 0, 2)}),
    "matrix": obj({"rows": arr(arr({"type": "integer", "minimum": 0, "maximum": 9}, 2, 2), 2, 2)}),
    "nested_three": obj({"a": obj({"b": obj({"c": SMALL_INT})})}),
    "optional_only": obj({"nickname": NAME, "age": SMALL_INT}, required=[]),
    "min_items_exact": obj({"pair": arr(NAME, 2, 2)}),
    "color": obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    "semver": obj({"version": {"type": "string", "pattern": "^[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}$"}}),
    "uuidish": obj({"id": {"type": "string", "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}$"}}),
    "money": obj({"amount": {"type": "integer", "minimum": 0, "maximum": 100000},
                  "currency": {"enum": ["USD", "EUR", "JPY"]}}),
    "user_profile": obj({"user": obj({"id": SMALL_INT, "name": NAME}), "roles": arr({"enum": ["admin", "user"]}, 1, 2),
                         "active": BOOL}),
    "invoice": obj({"number": SMALL_INT, "lines": arr(obj({"desc": S, "amount": PRICE}), 1, 2), "paid": BOOL}),
    "review": obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5}, "title": S,
                   "recommend": BOOL}),
    "recipe": obj({"name": NAME, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                   "ingredients": arr(NAME, 1, 3)}),
    "movie": obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                  "genres": arr({"enum": ["drama", "comedy", "action", "horror"]}, 1, 2)}),
    "geo_point": obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                      "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
    "key_value_list": obj({"pairs": arr(obj({"key": NAME, "value": {"anyOf": [S, SMALL_INT, BOOL]}}), 1, 3)}),
    "todo_list": obj({"todos": arr(obj({"task": S, "done": BOOL}), 1, 3)}),
    "log_record": obj({"level": {"enum": ["INFO", "WARN", "ERROR"]}, "message": S, "code": SMALL_INT}),
    "array_top_level": arr(obj({"id": SMALL_INT}), 1, 3),
    "string_top_level": {"type": "string", "enum": ["alpha", "beta", "gamma"]},
    "integer_top_level": {"type": "integer", "minimum": 10, "maximum": 20},
}

assert len(SCHEMAS) >= 50, len(SCHEMAS)
