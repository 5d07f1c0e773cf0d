#!/bin/sh
# Grafana's entrypoint in docker-compose.yml, guarded: refuse to start with no admin password, a
# placeholder (.env.example's, Grafana's own default) or one under 12 characters; else run "$@" (/run.sh).
# Grafana reads the password on its first start only; to change it later:
#   docker compose exec grafana grafana cli admin reset-admin-password NEW
password="$GF_SECURITY_ADMIN_PASSWORD"
case "$(printf '%s' "$password" | tr '[:upper:]' '[:lower:]')" in
  "" | change-me | changeme | change_me | admin | password | secret | grafana)
    echo "GRAFANA_ADMIN_PASSWORD is a placeholder: set a password of your own in .env" >&2
    exit 1 ;;
esac
if [ "${#password}" -lt 12 ]; then
  echo "GRAFANA_ADMIN_PASSWORD is too short (${#password} characters): use 12 or more in .env" >&2
  exit 1
fi
exec "$@"
