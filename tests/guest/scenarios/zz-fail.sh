step failing
fail "on purpose"
