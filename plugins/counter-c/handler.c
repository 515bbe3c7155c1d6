// counter-c: a Spate plugin in C, built with Debian's clang and wasi-libc, bindings from
// `wit-bindgen c` (generated from wit/ at build time), and wrapped into a component with
// the WASI preview1 adapter (`build.sh`). Counts the events of each key in state
// (`count/<key>`, decimal text), emits {"key", "count"} to `counts`, and starts the
// `milestone` workflow every 100th event of a key. An unkeyed event is rejected.
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "event_handler.h"

static void set_error(exports_spate_plugin_handler_handle_error_t *err, uint8_t tag, const char *reason) {
  err->tag = tag;
  // Freed by the generated post-return function after the host has read it.
  event_handler_string_dup(&err->val.reject, reason);
}

static event_handler_string_t borrow(const char *s) {
  event_handler_string_t out = {(uint8_t *)s, strlen(s)};
  return out;
}

bool exports_spate_plugin_handler_handle(exports_spate_plugin_handler_event_t *event,
                                         exports_spate_plugin_handler_handle_error_t *err) {
  bool ok = true;
  if (!event->key.is_some || event->key.val.len == 0 || event->key.val.len > 200 ||
      memchr(event->key.val.ptr, '"', event->key.val.len) || memchr(event->key.val.ptr, '\\', event->key.val.len)) {
    set_error(err, SPATE_PLUGIN_TYPES_HANDLE_ERROR_REJECT, "events must be keyed (1-200 bytes, no quotes)");
    ok = false;
    goto done;
  }
  const int klen = (int)event->key.val.len;
  const char *k = (const char *)event->key.val.ptr;

  char state_key[256];
  snprintf(state_key, sizeof state_key, "count/%.*s", klen, k);
  event_handler_string_t skey = borrow(state_key);

  // Reads see this call's own writes; every write applies only if we return true.
  uint64_t n = 0;
  event_handler_list_u8_t value;
  if (spate_plugin_state_get(&skey, &value)) {
    char buf[32] = {0};
    memcpy(buf, value.ptr, value.len < sizeof buf - 1 ? value.len : sizeof buf - 1);
    n = strtoull(buf, NULL, 10);
    event_handler_list_u8_free(&value);
  }
  n += 1;

  char text[32];
  int tlen = snprintf(text, sizeof text, "%" PRIu64, n);
  event_handler_list_u8_t new_value = {(uint8_t *)text, (size_t)tlen};
  spate_plugin_state_put(&skey, &new_value, NULL);

  char payload[320];
  int plen = snprintf(payload, sizeof payload, "{\"key\":\"%.*s\",\"count\":%" PRIu64 "}", klen, k, n);
  event_handler_string_t topic = borrow("counts");
  event_handler_list_u8_t body = {(uint8_t *)payload, (size_t)plen};
  spate_plugin_emit_list_header_t no_headers = {NULL, 0};
  spate_plugin_emit_emit(&topic, &event->key.val, &body, &no_headers);

  if (n % 100 == 0) {
    // The run id names this milestone: a retried event never starts it twice.
    char id[256];
    snprintf(id, sizeof id, "%.*s/%" PRIu64, klen, k, n);
    event_handler_string_t name = borrow("milestone");
    event_handler_string_t run = borrow(id);
    event_handler_list_u8_t input = {(uint8_t *)text, (size_t)tlen};
    spate_plugin_emit_start_workflow(&name, &run, &input);
  }

done:
  exports_spate_plugin_handler_event_free(event);
  return ok;
}
